"""ChatService: conversations in the store, replies from the engine, exact ids across turns."""

from __future__ import annotations

import pytest

from localchat.model.chat_template import encode, render
from localchat.engine.sampling_params import SamplingParams


def only_sample(updates):
    """The events of a one-sample reply (every update is the list of samples, here one)."""
    return [u[0] for u in updates]

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def service(chat_service):
    return chat_service(num_blocks=1024)


def test_turns_are_saved_with_exact_ids_and_hit_the_prefix_cache(service):
    conv = service.new_conversation("t", system_prompt="Be brief.")
    events = only_sample(service.send(conv.id, "Hello there", PARAMS))
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert "".join(e.delta_text for e in events) == events[-1].text
    path = service.store.current_path(conv.id)
    assert [m.role for m in path] == ["user", "assistant"]
    tok = service.tokenizer
    assert path[0].token_ids == encode(tok, render(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], True))
    assert len(path[1].token_ids) == 12 and path[1].content == events[-1].text
    assert path[1].finish_reason == "length" and path[1].generated_tokens == 12

    events2 = only_sample(service.send(conv.id, "Tell me more", PARAMS))
    path = service.store.current_path(conv.id)
    history = len(path[0].token_ids) + len(path[1].token_ids)
    assert events2[-1].prefix_hit_tokens >= history - 8
    prompt = [t for m in path[:3] for t in m.token_ids]
    assert events2[-1].prompt_tokens == len(prompt)


def test_regenerate_and_edit_make_siblings(service):
    conv = service.new_conversation()
    only_sample(service.send(conv.id, "First question", PARAMS))
    user, reply = service.store.current_path(conv.id)
    sampled = SamplingParams(temperature=1.0, seed=9, max_tokens=12, ignore_eos=True)
    events = only_sample(service.regenerate(reply.id, sampled))
    assert events[-1].prefix_hit_tokens >= len(user.token_ids) - 8
    siblings = service.store.siblings(events[-1].message_id)
    assert siblings.count == 2 and reply.id in siblings.ids

    events = only_sample(service.edit(user.id, "A different question", PARAMS))
    new_path = service.store.current_path(conv.id)
    assert new_path[0].content == "A different question"
    assert service.store.siblings(new_path[0].id).count == 2
    assert new_path[1].id == events[-1].message_id


def test_abandoned_stream_keeps_what_was_shown(service):
    conv = service.new_conversation()
    stream = service.send(conv.id, "Go on", SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    seen = [next(stream)[0] for _ in range(3)]
    stream.close()  # the browser tab went away
    reply = service.store.current_path(conv.id)[-1]
    assert reply.finish_reason == "abort"
    assert reply.content.startswith("".join(e.delta_text for e in seen))
    assert service.driver.call(lambda e: e.block_manager.figures().blocks_used) == 0


def test_empty_message_is_rejected_and_nothing_is_saved(service):
    conv = service.new_conversation()
    with pytest.raises(ValueError, match="empty"):
        only_sample(service.send(conv.id, "   ", PARAMS))
    assert service.store.current_path(conv.id) == []
