"""The real default model in bfloat16 against transformers' bfloat16: prefill bit for bit, greedy replies on
most prompts (decode attention sums in a different order, so a near-tie can part the two later)."""

from __future__ import annotations

import pytest
import torch

import kernels
from localchat.engine.engine import Engine, EngineConfig
from localchat.model.chat_template import prompt_ids
from localchat.model.loader import default_dtype, load_model
from localchat.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "Why is the sky blue?",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to cook.",
    "Write a short story about a dragon who learns to cook.",
    "List the planets of the solar system.",
    "How do I reverse a list in Python?",
    "What is the capital of France?",
    "What is 12 times 7?",
]


@pytest.fixture(scope="module")
def bf16():
    from transformers import AutoModelForCausalLM

    loaded = load_model(None, dtype=torch.bfloat16, device="cpu")
    engine = Engine.from_loaded(loaded, EngineConfig(kv_cache_gb=0.1))
    reference = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.bfloat16).eval()
    prompts = [prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    return loaded, engine, reference, prompts


def test_prefill_logits_are_bit_identical(bf16):
    loaded, engine, reference, prompts = bf16
    for ids in prompts[:3]:
        n = len(ids)
        meta = kernels.build_metadata([list(range(1, 2 + n // 16))], [n], [n], 16)
        with torch.inference_mode():
            ours = loaded.model(torch.tensor(ids), torch.arange(n), engine.runner.kv_caches, meta)
            theirs = reference(torch.tensor([ids])).logits[0].float()
        assert torch.equal(ours[-1], theirs[-1])
        assert torch.equal(ours, theirs)  # every position, not only the sampled one


@pytest.mark.skipif(default_dtype("cpu") != torch.bfloat16, reason=(
    "this CPU has no native bfloat16 (the engine defaults to float32 here): ATen emulates bfloat16 GEMMs and sums "
    "batched and single rows in different orders, so replies part at near-ties (measured on an AVX2-only Zen 3: "
    "4-5 of 8 equal, the earliest at token 3 on a 0.034 float32 logit gap; benchmarks/NOTES.md session 8)"))
def test_greedy_replies_match_on_most_prompts(bf16):
    loaded, engine, reference, prompts = bf16
    eos = set(loaded.eos_token_ids)
    outs = engine.generate(prompt_token_ids=prompts, params=SamplingParams(max_tokens=24, temperature=0.0))
    same = 0
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        ours = list(out.outputs[0].token_ids)
        ref = ref[:-1] if ref and ref[-1] in eos else ref
        ours = ours[:-1] if ours and ours[-1] in eos else ours
        assert ours[:4] == ref[:4]  # a bf16 near-tie this early would be a bug, not rounding
        same += ours == ref
    assert same >= 6, f"only {same}/{len(prompts)} bfloat16 greedy replies equal transformers'"
