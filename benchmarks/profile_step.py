"""Where a decode step's time goes: steps/s at batch B, a torch.profiler table, and the floors.

usage: python benchmarks/profile_step.py [dtype] [batch] [context]
"""
import sys, time
import torch
from localchat.engine.engine import Engine, EngineConfig
from localchat.model.loader import load_model
from localchat.engine.sampling_params import SamplingParams

dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
B = int(sys.argv[2]) if len(sys.argv) > 2 else 1
ctx = int(sys.argv[3]) if len(sys.argv) > 3 else 256
prof = "--prof" in sys.argv
if "--t1" in sys.argv: torch.set_num_threads(1)
lm = load_model(None, dtype=dtype)
eng = Engine.from_loaded(lm, EngineConfig(kv_cache_gb=1.0, max_num_batched_tokens=2048))
import random
rng = random.Random(0)
for i in range(B):
    eng.add(eng.make_request(prompt_token_ids=[rng.randrange(100, 49000) for _ in range(ctx)], params=SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)))
while any(s.num_output_tokens == 0 for r in eng.requests.values() for s in r.seqs):
    eng.step()
for _ in range(3):
    eng.step()
n = 20
t = time.perf_counter()
for _ in range(n):
    eng.step()
el = (time.perf_counter() - t) / n
print(f"{dtype} batch {B} ctx {ctx}: {el*1000:.1f} ms/step, {B/el:.1f} tok/s")
# forward only
runner = eng.runner
sched = eng.scheduler.schedule()
t = time.perf_counter()
for _ in range(5):
    runner.execute(sched.work, [])
print(f"  runner.execute only: {(time.perf_counter()-t)/5*1000:.1f} ms")
eng.scheduler.commit(sched)
if prof:
    with torch.autograd.profiler.profile() as p:
        for _ in range(5):
            eng.step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
