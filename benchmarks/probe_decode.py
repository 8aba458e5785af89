"""Quick probe: single-sequence decode, ours vs transformers, one dtype."""
import sys, time, os
import torch
from localchat.engine.engine import Engine, EngineConfig
from localchat.engine.sampling_params import SamplingParams
from localchat.model.loader import load_model
from transformers import AutoModelForCausalLM

dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 64
lm = load_model(None, dtype=dtype)
eng = Engine.from_loaded(lm, EngineConfig(kv_cache_gb=0.25))
ids = eng.encode("Write a long story about a dragon who learns to cook." * 3)
p = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
eng.generate(prompt_token_ids=[ids], params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
t = time.perf_counter(); out = eng.generate(prompt_token_ids=[ids], params=p); el = time.perf_counter() - t
print(f"ours {dtype}: {N/el:.1f} tok/s (incl prefill {len(ids)})")
hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=dtype).eval()
x = torch.tensor([ids])
with torch.inference_mode():
    hf.generate(x, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    t = time.perf_counter(); g = hf.generate(x, max_new_tokens=N, min_new_tokens=N, do_sample=False); el = time.perf_counter() - t
print(f"hf {dtype}: {N/el:.1f} tok/s")
a = out[0].outputs[0].token_ids; b = g[0, len(ids):].tolist()
agree = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), len(a))
print("agree prefix", agree, "of", N)
