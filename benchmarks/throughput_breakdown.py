"""Where the throughput suite's time goes: our engine alone on the bench's workload, steps split into
those with prompt tokens and decode-only steps by batch size.

usage: python benchmarks/throughput_breakdown.py [--quick]
"""
import collections
import sys
import time

import torch

from localchat.bench import suites as bench
from localchat.model.loader import load_model

sizes = bench.Sizes.preset("quick" if "--quick" in sys.argv else "full")
lm = load_model(None, dtype=torch.bfloat16)
ctx = bench.BenchContext(model=lm.model, hf_config=lm.config, tokenizer=lm.tokenizer, dtype=torch.bfloat16,
                         device=lm.device, eos_token_ids=lm.eos_token_ids)
work = bench.make_workload(sizes, int(lm.config.vocab_size))
engine = ctx.engine(kv_cache_gb=sizes.kv_cache_gb, max_num_seqs=max(64, sizes.num_requests),
                    max_num_batched_tokens=sizes.max_num_batched_tokens)
bench._run_engine(engine, [(work[0][0][:16], bench._params(4))])
engine.block_manager.reset_prefix_cache()
steps = []  # (sequences, new tokens, seconds) per forward pass
execute = engine.runner.execute


def timed(work_items, copies):
    start = time.perf_counter()
    logits = execute(work_items, copies)
    steps.append((len(work_items), sum(w.num_new_tokens for w in work_items), time.perf_counter() - start))
    return logits


engine.runner.execute = timed
seconds, _ = bench._run_engine(engine, [(p, bench._params(o)) for p, o in work])
output = sum(o for _, o in work)
forward = sum(s for *_, s in steps)
prompt = [s for s in steps if s[1] > s[0]]
decode = [s for s in steps if s[1] == s[0]]
print(f"{seconds:.1f} s, {output / seconds:.1f} generated tok/s, {len(steps)} steps; forward {forward:.1f} s "
      f"(steps with prompt tokens: {len(prompt)}, {sum(s for *_, s in prompt):.1f} s; decode-only: {len(decode)}, "
      f"{sum(s for *_, s in decode):.1f} s); outside the forward {seconds - forward:.1f} s")
buckets = collections.defaultdict(lambda: [0, 0.0])
for seqs, _, s in decode:
    bound = next(b for b in (1, 4, 16, 64, 1 << 30) if seqs <= b)
    buckets[bound][0] += 1
    buckets[bound][1] += s
for bound, (count, total) in sorted(buckets.items()):
    print(f"  decode batch <= {bound}: {count} steps, {total:.2f} s, {total / count * 1e3:.1f} ms/step")
