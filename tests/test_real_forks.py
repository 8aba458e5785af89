"""Forks on the real default model: n samples through the CLI, beam search against transformers,
and multi-turn chats that hit the prefix cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from localchat.model.chat_template import continuation_ids, encode, render
from localchat.engine.engine import Engine, EngineConfig
from localchat.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

LONG_TEXT = " ".join(
    f"Note {i}: the {['red', 'green', 'blue', 'amber'][i % 4]} valve on line {i * 3 % 17} was checked and logged at {i % 12 + 1} o'clock."
    for i in range(1, 44)
)


def engine_for(smol, **kwargs) -> Engine:
    config = EngineConfig(**{"num_blocks": 1024, **kwargs})
    return Engine.from_loaded(smol, config)


def test_n4_samples_of_a_1000_token_prompt_share_it(tmp_path):
    prompt = LONG_TEXT + " Write a short poem inspired by these notes."
    proc = subprocess.run(
        [sys.executable, "-m", "localchat", "generate", prompt, "--n", "4", "--seed", "3", "--temperature", "0.9",
         "--max-tokens", "64", "--ignore-eos", "--dtype", "float32", "--json", "--kv-cache-gb", "0.2"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    n_prompt = len(doc["prompt_token_ids"])
    assert 1000 <= n_prompt <= 1100
    assert len(doc["outputs"]) == 4 and all(len(o["token_ids"]) == 64 for o in doc["outputs"])
    assert len({tuple(o["token_ids"]) for o in doc["outputs"]}) == 4
    bs = doc["memory"]["block_size"]
    prompt_blocks = -(-n_prompt // bs)
    reply_blocks = -(-64 // bs)
    sharing = doc["sharing"]
    assert sharing["blocks_used_peak"] <= prompt_blocks + 4 * reply_blocks + 4
    assert sharing["blocks_unshared_peak"] >= 4 * prompt_blocks
    assert sharing["sharing_savings"] >= 0.6
    assert sharing["cow_copies"] >= 3
    assert doc["memory"]["blocks_used"] == 0


BEAM_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping well.",
    "Write a haiku about autumn.",
]


@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_equals_transformers(smol, smol_reference, width):
    engine = engine_for(smol)
    for question in BEAM_PROMPTS if width > 2 else BEAM_PROMPTS[:1]:  # the narrow beam on one prompt: CI's time
        ids = encode(smol.tokenizer, render(smol.tokenizer, [{"role": "user", "content": question}], True))
        params = SamplingParams(beam_width=width, max_tokens=32, length_penalty=1.0, early_stopping=False)
        out = engine.generate(prompt_token_ids=[ids], params=params)[0]
        assert len(out.outputs) == width
        scores = [o.cumulative_logprob / len(o.token_ids) for o in out.outputs]
        assert scores == sorted(scores, reverse=True)
        with torch.inference_mode():
            ref = smol_reference.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), num_beams=width,
                do_sample=False, max_new_tokens=32, length_penalty=1.0, early_stopping=False,
                eos_token_id=smol.eos_token_ids, pad_token_id=smol.eos_token_ids[0],
            )[0, len(ids):].tolist()
        eos = smol.eos_token_ids[0]
        if eos in ref:  # transformers pads finished hypotheses with the pad (= eos) token
            ref = ref[: ref.index(eos) + 1]
        assert out.outputs[0].token_ids == ref, question
        assert engine.block_manager.figures().blocks_used == 0
    # The beams' common history was stored once.
    assert engine.memory()["sharing_savings_peak"] >= 0.3


def greedy_reply(engine: Engine, prompt_ids: list[int]):
    out = engine.generate(prompt_token_ids=[prompt_ids], params=SamplingParams(temperature=0, max_tokens=48))[0]
    return out


def test_turn_two_prefills_only_new_tokens_and_branches_hit_later(smol):
    engine = engine_for(smol, block_size=16)
    tok = smol.tokenizer
    history = [{"role": "system", "content": "You are a concise assistant. " + LONG_TEXT[:1500]},
               {"role": "user", "content": "Which valve was checked at 3 o'clock?"}]
    turn1_ids = encode(tok, render(tok, history, True))
    turn1 = greedy_reply(engine, turn1_ids)
    reply = turn1.outputs[0]
    assert turn1.metrics.prefix_hit_tokens == 0
    history.append({"role": "assistant", "content": reply.text})

    def next_turn(question: str) -> list[int]:
        return turn1_ids + reply.token_ids + continuation_ids(tok, history, reply.token_ids, [{"role": "user", "content": question}])

    turn2_ids = next_turn("And at 5 o'clock?")
    # The exact ids render to the same text the template gives for the whole conversation.
    assert tok.decode(turn2_ids) == render(tok, history + [{"role": "user", "content": "And at 5 o'clock?"}], True)
    hist_len = len(turn1_ids) + len(reply.token_ids)
    turn2 = greedy_reply(engine, turn2_ids)
    assert turn2.metrics.prefix_hit_tokens >= hist_len - engine.block_manager.block_size

    # Another conversation runs in between, then the user goes back and branches turn 2.
    greedy_reply(engine, encode(tok, render(tok, [{"role": "user", "content": "Tell me about owls."}], True)))
    branch = greedy_reply(engine, next_turn("Which valve was blue?"))
    assert branch.metrics.prefix_hit_tokens >= hist_len - engine.block_manager.block_size
    # Regenerate turn 2 exactly: the whole prompt but its last token comes from the cache.
    again = greedy_reply(engine, turn2_ids)
    bs = engine.block_manager.block_size
    if len(turn2_ids) + len(turn2.outputs[0].token_ids) - 1 >= -(-len(turn2_ids) // bs) * bs:
        # turn 2's reply filled the block its prompt ended in, so that block is cached and lends its
        # leading tokens: only the prompt's last token is computed again
        assert again.metrics.prefix_hit_tokens == len(turn2_ids) - 1
    else:
        assert again.metrics.prefix_hit_tokens >= len(turn2_ids) - bs
    assert again.outputs[0].token_ids == turn2.outputs[0].token_ids
    assert engine.block_manager.figures().blocks_used == 0
