"""Greedy agreement of our bfloat16 path with transformers' bfloat16 `generate` on real chat prompts.

usage: python benchmarks/bf16_agreement.py [max_new_tokens]
Prints, per prompt, the length of the common greedy prefix and the share of positions that agree.
Both stop at the end-of-turn token (or after max_new_tokens): forcing a length would need transformers'
min_new_tokens, which bans EOS and so picks a different token exactly where ours (ignore_eos) takes EOS.
Prefill is bit-identical to transformers in bfloat16; decode attention accumulates in a different order, so
after a near-tie (bf16 logits carry ~3 significant digits) the two continuations can part. float32 is the
exactness check (tests).
"""
import sys

import torch
from transformers import AutoModelForCausalLM

from localchat.bench.quality import CHAT_PROMPTS
from localchat.engine.engine import Engine, EngineConfig
from localchat.model.chat_template import prompt_ids
from localchat.model.loader import load_model
from localchat.engine.sampling_params import SamplingParams

PROMPTS = list(CHAT_PROMPTS)  # the bench's quality suite asks the same 12 prompts

n = int(sys.argv[1]) if len(sys.argv) > 1 else 48
dtype = torch.bfloat16
lm = load_model(None, dtype=dtype)
engine = Engine.from_loaded(lm, EngineConfig(kv_cache_gb=0.25))
hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=dtype).eval()
hf32 = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
prompts = [prompt_ids(lm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
outs = engine.generate(prompt_token_ids=prompts, params=SamplingParams(max_tokens=n, temperature=0.0))
eos = set(lm.eos_token_ids)


def strip_eos(ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


total_prefix = total_same = total = exact = 0
vs32 = {"ours bf16": 0, "transformers bf16": 0}
for text, ids, out in zip(PROMPTS, prompts, outs):
    with torch.inference_mode():
        ref = strip_eos(hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist())
        ref32 = strip_eos(hf32.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist())
    ours = strip_eos(list(out.outputs[0].token_ids))
    length = max(len(ours), len(ref))
    for name, seq in (("ours bf16", ours), ("transformers bf16", ref)):
        vs32[name] += len(ref32) if seq == ref32 else common_prefix(seq, ref32)
    prefix = length if ours == ref else common_prefix(ours, ref)
    same = sum(a == b for a, b in zip(ours, ref))
    total_prefix += prefix
    total_same += same
    total += length
    exact += ours == ref
    print(f"{prefix:3d}/{length} common prefix, {same:3d}/{length} positions equal  {text!r}")
print(f"prompts fully equal: {exact}/{len(PROMPTS)}; common-prefix tokens {total_prefix}/{total} "
      f"({total_prefix / total:.0%}); equal positions {total_same}/{total}")
print("common prefix with transformers float32 greedy: " + ", ".join(f"{k} {v}" for k, v in vs32.items()))
