"""The real default model end to end: greedy ids equal transformers' generate in float32."""

from __future__ import annotations

import pytest
import torch

from localchat.engine.engine import Engine, EngineConfig
from localchat.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 64

LONG_STORY = (
    "Here are my notes from the week. "
    + " ".join(
        f"On day {i} the team reviewed item {i * 7 % 13}, fixed {i % 5} bugs, and wrote {i * 3} lines of tests."
        for i in range(1, 60)
    )
    + " Summarize these notes day by day, in detail."
)

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Describe its history and landmarks in detail."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me a long story about the sea and your ship."}],
    [{"role": "user", "content": "Write a Python function that reverses a string, with docstring, tests and an explanation."}],
    [
        {"role": "user", "content": "Hi! Can you help me plan a trip?"},
        {"role": "assistant", "content": "Of course! Where would you like to go?"},
        {"role": "user", "content": "Somewhere warm in winter. List five options and describe each in detail."},
    ],
    [{"role": "user", "content": LONG_STORY}],
]


@pytest.fixture(scope="module")
def chat_prompts(smol):
    from localchat.model.chat_template import encode, render

    prompts = [encode(smol.tokenizer, render(smol.tokenizer, m, add_generation_prompt=True)) for m in CHATS]
    assert max(len(p) for p in prompts) > 1000
    return prompts


@pytest.fixture(scope="module")
def reference_ids(smol, smol_reference, chat_prompts):
    """transformers' greedy generate, one prompt at a time (no padding), float32."""
    out = []
    with torch.inference_mode():
        for prompt in chat_prompts:
            ids = smol_reference.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=smol.eos_token_ids,
                pad_token_id=smol.eos_token_ids[0],
            )
            out.append(ids[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize("block_size", [1, 16])  # one token a block (every boundary), and the default
def test_greedy_ids_equal_transformers_generate(smol, chat_prompts, reference_ids, block_size):
    engine = Engine.from_loaded(smol, EngineConfig(block_size=block_size, num_blocks=4096 // block_size * 2))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    outputs = engine.generate(prompt_token_ids=chat_prompts, params=params)
    assert sum(len(r) == NEW_TOKENS for r in reference_ids) >= 4, [len(r) for r in reference_ids]
    for i, (out, ref) in enumerate(zip(outputs, reference_ids)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} differs at block_size {block_size}"
    assert engine.block_manager.figures().blocks_used == 0


def test_chat_reply_is_sensible(smol):
    engine = Engine.from_loaded(smol, EngineConfig(num_blocks=256))
    out = engine.generate(["What is the capital of France?"], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
