"""Greedy agreement of our bfloat16 path with transformers' bfloat16 `generate` on real chat prompts.

usage: python benchmarks/bf16_agreement.py [max_new_tokens]
Prints, per prompt, the length of the common greedy prefix and the share of positions that agree.
Both systems round differently in bfloat16 (we run attention in float32 on the CPU, transformers in
bfloat16), so after a near-tie the two continuations can part; float32 is the exactness check (tests).
"""
import sys

import torch
from transformers import AutoModelForCausalLM

from localchat.engine import Engine, EngineConfig
from localchat.models import load_model
from localchat.sampling_params import SamplingParams

PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to cook.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Write a short story about a dragon who learns to cook.",
    "List the planets of the solar system.",
    "How do I reverse a list in Python?",
    "What causes rain?",
    "Name a color.",
]

n = int(sys.argv[1]) if len(sys.argv) > 1 else 48
dtype = torch.bfloat16
lm = load_model(None, dtype=dtype)
engine = Engine(lm.model, lm.config, lm.tokenizer, dtype=dtype, config=EngineConfig(kv_cache_gb=0.25), eos_token_ids=lm.eos_token_ids)
hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=dtype).eval()
hf32 = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
prompts = [engine.tokenize_messages([{"role": "user", "content": p}]) for p in PROMPTS]
outs = engine.generate(prompt_token_ids=prompts, params=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
total_prefix = total_same = total = exact = 0
vs32 = {"ours bf16": 0, "transformers bf16": 0}
for text, ids, out in zip(PROMPTS, prompts, outs):
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
        ref32 = hf32.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    ours = out.outputs[0].token_ids
    for name, seq in (("ours bf16", ours), ("transformers bf16", ref)):
        vs32[name] += next((i for i, (a, b) in enumerate(zip(seq, ref32)) if a != b), n)
    prefix = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), n)
    same = sum(a == b for a, b in zip(ours, ref))
    total_prefix += prefix
    total_same += same
    total += n
    exact += prefix == n
    print(f"{prefix:3d}/{n} common prefix, {same:3d}/{n} positions equal  {text!r}")
print(f"prompts fully equal: {exact}/{len(PROMPTS)}; common-prefix tokens {total_prefix}/{total} "
      f"({total_prefix / total:.0%}); equal positions {total_same}/{total}")
print("common prefix with transformers float32 greedy: " + ", ".join(f"{k} {v}/{total}" for k, v in vs32.items()))
