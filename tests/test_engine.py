"""The engine on tiny random-weight models: batching, preemption, aborts, sampling, bad input."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from localchat.engine.driver import EngineDriver
from localchat.engine import RequestError
from localchat.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def random_prompts(n: int, seed: int = 0, lo: int = 5, hi: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40_000) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def run_all(engine, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in engine.generate(prompt_token_ids=prompts, params=params)]


def reference_greedy(hf_model, prompt: list[int], max_new: int) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, min_new_tokens=max_new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_on_tiny_model(tiny_engine):
    engine = tiny_engine(block_size=4, config_overrides={"num_key_value_heads": 1, "num_attention_heads": 3, "hidden_size": 48, "head_dim": 16})
    prompts = random_prompts(3, seed=1, hi=60)
    ours = run_all(engine, prompts, GREEDY.with_(max_tokens=12))
    for prompt, got in zip(prompts, ours):
        assert got == reference_greedy(engine.hf_model, prompt, 12)


def test_batched_equals_one_at_a_time_and_survives_preemption(tiny_engine):
    prompts = random_prompts(16, seed=2)
    alone = []
    engine = tiny_engine(num_blocks=512)
    for p in prompts:
        alone.append(run_all(engine, [p])[0])
    batched_engine = tiny_engine(num_blocks=512)
    assert run_all(batched_engine, prompts) == alone
    assert batched_engine.block_manager.figures().blocks_used == 0

    # A pool far too small for all 16 at once: the newest are preempted and recomputed.
    small = tiny_engine(num_blocks=40, max_num_batched_tokens=128)
    assert run_all(small, prompts) == alone
    figures = small.block_manager.figures()
    assert figures.preemptions > 0
    assert figures.blocks_used == 0
    small.block_manager.check_invariants()


@pytest.mark.parametrize("block_size", [1, 7, 32])
def test_outputs_do_not_depend_on_block_size_chunking_or_cache(tiny_engine, block_size):
    prompts = random_prompts(6, seed=3)
    base = run_all(tiny_engine(block_size=16), prompts)
    engine = tiny_engine(block_size=block_size, num_blocks=8192 // block_size, max_num_batched_tokens=37)
    assert run_all(engine, prompts) == base
    # Again on a warm prefix cache: prompts hit, outputs stay the same.
    assert run_all(engine, prompts) == base
    assert engine.block_manager.figures().prefix_hit_tokens > 0


def test_regenerate_and_edit_compute_only_what_differs(tiny_engine):
    """A regenerate's prompt ends inside the block its first reply filled, an edit diverges inside a
    block: the engine borrows the cached leading tokens of that block, computes the rest (for a
    regenerate, only the last token) into a copy, and answers exactly as without any cache."""
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 40_000) for _ in range(n)] for n in (37, 48, 64, 16)]
    edits = [p[:-7] + [rng.randrange(100, 40_000) for _ in range(5)] for p in prompts]
    fresh = tiny_engine(enable_prefix_cache=False)
    expected = run_all(fresh, prompts) + run_all(fresh, edits)
    engine = tiny_engine()
    assert run_all(engine, prompts) == expected[:4]
    again = engine.generate(prompt_token_ids=prompts, params=GREEDY)
    assert [o.outputs[0].token_ids for o in again] == expected[:4]
    assert [o.metrics.prefix_hit_tokens for o in again] == [len(p) - 1 for p in prompts]
    edited = engine.generate(prompt_token_ids=edits, params=GREEDY)
    assert [o.outputs[0].token_ids for o in edited] == expected[4:]
    assert [o.metrics.prefix_hit_tokens for o in edited] == [len(p) - 7 for p in prompts]
    figures = engine.block_manager.figures()
    assert figures.blocks_used == 0 and figures.cow_copies >= 8
    engine.block_manager.check_invariants()


def test_abort_half_mid_stream(tiny_engine):
    prompts = random_prompts(16, seed=4)
    expected = run_all(tiny_engine(), prompts)
    engine = tiny_engine()
    ids = [engine.add_request(prompt_token_ids=p, params=GREEDY) for p in prompts]
    finals = {}
    for _ in range(8):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    used_before = engine.block_manager.figures().blocks_used
    for rid in ids[::2]:
        out = engine.abort(rid)
        assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.figures().blocks_used < used_before
    engine.block_manager.check_invariants()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    for i, rid in enumerate(ids):
        if i % 2:
            assert finals[rid].outputs[0].token_ids == expected[i]
    assert engine.block_manager.figures().blocks_used == 0


def test_streamed_deltas_add_up(tiny_engine, smol_tokenizer):
    engine = tiny_engine()
    rid = engine.add_request("Tell me a story", params=SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True))
    text, ids = "", []
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            text += out.outputs[0].delta_text
            ids += out.outputs[0].delta_token_ids
            final = out
    assert final.request_id == rid and final.finished
    assert ids == final.outputs[0].token_ids and len(ids) == 30
    assert text == final.outputs[0].text == smol_tokenizer.decode(ids, skip_special_tokens=True)
    assert final.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    prompts = random_prompts(4, seed=5)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=16, ignore_eos=True)
    alone = run_all(tiny_engine(), prompts[:1], params)[0]
    together = run_all(tiny_engine(), prompts, [params, params.with_(seed=7), params.with_(seed=None), params])
    assert together[0] == alone
    assert together[0] != together[1]
    other = run_all(tiny_engine(), prompts[:1], params.with_(seed=124))[0]
    assert other != alone


def test_stop_strings_and_stop_tokens(tiny_engine, smol_tokenizer):
    engine = tiny_engine()
    prompt = random_prompts(1, seed=6)[0]
    full = run_all(engine, [prompt], GREEDY.with_(max_tokens=20))[0]
    text = smol_tokenizer.decode(full, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop
    out = engine.generate(prompt_token_ids=[prompt], params=GREEDY.with_(max_tokens=20, stop=(stop,)))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    out = engine.generate(prompt_token_ids=[prompt], params=GREEDY.with_(stop_token_ids=(full[4],)))[0].outputs[0]
    assert out.token_ids == full[: full.index(full[4]) + 1] and out.finish_reason == "stop"


def test_eos_finishes_with_stop(tiny_engine):
    engine = tiny_engine()
    prompt = random_prompts(1, seed=8)[0]
    first = run_all(engine, [prompt], GREEDY.with_(max_tokens=1))[0][0]
    engine.eos_token_ids = {first}
    out = engine.generate(prompt_token_ids=[prompt], params=SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"


def test_logprobs_match_reference(tiny_engine):
    engine = tiny_engine()
    prompt = random_prompts(1, seed=9, lo=20, hi=21)[0]
    out = engine.generate(prompt_token_ids=[prompt], params=GREEDY.with_(max_tokens=3, logprobs=True))[0].outputs[0]
    logits = engine.hf_model(torch.tensor([prompt + out.token_ids])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp == pytest.approx(ref[len(prompt) - 1 + i, tok].item(), abs=1e-4)


def test_context_limit_stops_with_length(tiny_engine):
    engine = tiny_engine(max_model_len=40)
    out = engine.generate(prompt_token_ids=[list(range(100, 130))], params=GREEDY.with_(max_tokens=100))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": "   "}, "empty"),
        ({"prompt_token_ids": []}, "empty"),
        ({"messages": []}, "empty"),
        ({"prompt_token_ids": list(range(100, 700))}, "context"),
        ({"prompt_token_ids": [10**9]}, r"\[0, "),
    ],
)
def test_bad_requests_get_clear_errors_and_engine_stays_usable(tiny_engine, kwargs, message):
    engine = tiny_engine()
    with pytest.raises(RequestError, match=message):
        engine.add_request(**kwargs, params=GREEDY)
    assert not engine.has_unfinished()
    assert run_all(engine, random_prompts(1))[0]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_sampling_values(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_prompt_bigger_than_pool_is_rejected(tiny_engine):
    engine = tiny_engine(num_blocks=4, block_size=4)
    with pytest.raises(RequestError, match="KV cache"):
        engine.add_request(prompt_token_ids=list(range(100, 120)), params=GREEDY)


def test_driver_serves_concurrent_clients_and_aborts(tiny_engine):
    engine = tiny_engine()
    prompts = random_prompts(6, seed=10)
    expected = run_all(tiny_engine(), prompts)
    driver = EngineDriver(engine)
    try:
        results: dict[int, list[int]] = {}

        def client(i):
            results[i] = driver.submit(prompt_token_ids=prompts[i], params=GREEDY).result().outputs[0].token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        stream = driver.submit(prompt_token_ids=prompts[0], params=GREEDY.with_(max_tokens=10_000 - 400))
        for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                stream.abort()
        assert stream.final.outputs[0].finish_reason == "abort"
        for t in threads:
            t.join(timeout=120)
        assert [results[i] for i in range(6)] == expected
        with pytest.raises(RequestError):
            driver.submit(prompt="")
        assert driver.call(lambda e: e.block_manager.figures().blocks_used) == 0
    finally:
        driver.shutdown()


def test_a_warm_up_computes_replies_and_leaves_the_engine_as_built(tiny_engine):
    # The app's engine process warms up after it says ready (localchat/engine/process.py): the person's first
    # reply must then meet the engine exactly as built, only without its one-time costs.
    fresh, warmed = tiny_engine(seed=3), tiny_engine(seed=3)
    calls = []
    execute = warmed.runner.execute
    warmed.runner.execute = lambda *a, **k: calls.append(1) or execute(*a, **k)
    warmed.warm_up()
    assert len(calls) == 4  # two replies of two tokens: a prompt step and a decode step each
    warmed.runner.execute = execute
    assert warmed.memory() == fresh.memory() and warmed.steps == 0
    view = warmed.block_manager.timeline.view()
    assert view.samples == () and view.events == ()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ids = [warmed.add_request(prompt="the first message after the start", params=params)]
    ids.append(fresh.add_request(prompt="the first message after the start", params=params))
    assert ids[0] == ids[1]
    warmed.step(), fresh.step()
    tables = [{sid: list(t.blocks) for sid, t in e.block_manager.tables.items()} for e in (warmed, fresh)]
    assert tables[0] == tables[1] and list(tables[0]) == [0]
    outs = []
    for engine in (warmed, fresh):
        while engine.has_unfinished():
            done = [o for o in engine.step() if o.finished]
            outs += done
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_a_warm_up_refuses_an_engine_that_has_requests(tiny_engine):
    engine = tiny_engine()
    engine.add_request(prompt="a request already waiting", params=SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="no requests"):
        engine.warm_up()
    assert len(engine.requests) == 1 and engine.has_unfinished()
