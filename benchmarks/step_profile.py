"""Where a batch-1 decode step's time goes, before (dense bfloat16, torch ops) and after (GGUF blocks, one native call).

usage: python benchmarks/step_profile.py [CONTEXT] [TOKENS]

For each weights mode, one sequence decodes (greedy; the native step also sampled with the app's defaults) TOKENS tokens after a CONTEXT-token prompt, and the step is split
into ms per token:
  weights    the products with the weights (dense: every linear incl. the LM head; gguf: the native call at a
             1-token context, which is all weight streaming, plus the LM head)
  attention  decode attention over the context (dense: the paged-attention calls; gguf: the native call at
             CONTEXT minus at a 1-token context)
  overhead   everything else: Python, dispatch, scheduling, sampling, detokenizing
The dense split comes from torch's profiler-free timing of the same calls (cProfile's own time of the ops);
the two modes run in the same process, one after the other.
"""

from __future__ import annotations

import cProfile
import pstats
import random
import statistics
import sys
import time

import torch

from localchat.engine import Engine, EngineConfig, SamplingParams
from localchat.model import load_model

CONTEXT = int(sys.argv[1]) if len(sys.argv) > 1 else 400
TOKENS = int(sys.argv[2]) if len(sys.argv) > 2 else 100


GREEDY = {"temperature": 0.0}
# the app's defaults (localchat/settings.py): a chat in the page samples every token
APP_DEFAULTS = {"temperature": 0.7, "top_p": 0.95}


def decode(engine: Engine, prompt: list[int], n: int, sampling: dict = GREEDY) -> float:
    """Seconds per decode step (after the prompt's step)."""
    engine.add(engine.make_request(prompt_token_ids=prompt, params=SamplingParams(**sampling, max_tokens=n, ignore_eos=True)))
    stamps = []
    while engine.has_unfinished():
        engine.step()
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (n - 1)


def dense_profile(prompt: list[int]) -> dict:
    loaded = load_model(None, weights="bfloat16")
    engine = Engine.from_loaded(loaded, EngineConfig(kv_cache_gb=0.2, enable_prefix_cache=False))
    decode(engine, prompt, 8)
    step = statistics.median(decode(engine, prompt, TOKENS) for _ in range(3))
    profiler = cProfile.Profile()
    profiler.enable()
    decode(engine, prompt, TOKENS)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    own = {f"{func[0]}:{func[2]}": tt for func, (_, _, tt, _, _) in stats.items()}
    total = sum(own.values())
    linears = sum(v for k, v in own.items() if "_linear_pointwise" in k or k.endswith(":<built-in method torch._C._nn.linear>"))
    attention = sum(v for k, v in own.items() if "paged_decode" in k or "scaled_dot_product" in k or "localchat_paged" in k)
    # cProfile slows the Python parts; scale its shares to the unprofiled step.
    scale = step / (total / (TOKENS - 1))
    weights = linears / (TOKENS - 1) * scale
    attn = attention / (TOKENS - 1) * scale
    return {"step": step, "weights": weights, "attention": attn, "overhead": step - weights - attn}


def native_profile(prompt: list[int], sampling: dict = GREEDY) -> dict:
    from localchat.model.native import NativeForward

    loaded = load_model(None, weights="gguf")
    engine = Engine.from_loaded(loaded, EngineConfig(kv_cache_gb=0.2, enable_prefix_cache=False))
    decode(engine, prompt, 8, sampling)
    step = statistics.median(decode(engine, prompt, TOKENS, sampling) for _ in range(3))
    calls: list[tuple[int, float]] = []  # (context of the call's last token, seconds)
    original = NativeForward.__call__

    def timed(self, input_ids, positions, *rest):
        t0 = time.perf_counter()
        out = original(self, input_ids, positions, *rest)
        calls.append((int(positions[-1]) + 1, time.perf_counter() - t0))
        return out

    NativeForward.__call__ = timed
    try:
        decode(engine, prompt, TOKENS, sampling)  # decode at the full context
        decode(engine, prompt[:1], TOKENS, sampling)  # and right at the start: the same weights, next to no attention
    finally:
        NativeForward.__call__ = original
    at_context = statistics.median(t for c, t in calls if c > CONTEXT)
    at_start = statistics.median(t for c, t in calls if 1 < c <= TOKENS)
    return {"step": step, "weights": at_start, "attention": max(0.0, at_context - at_start), "overhead": step - at_context}


def main() -> None:
    torch.set_num_threads(2)
    rng = random.Random(1)
    prompt = [rng.randrange(100, 49152) for _ in range(CONTEXT)]
    rows = {"before (dense bfloat16, torch ops)": dense_profile(prompt), "after (GGUF blocks, native step)": native_profile(prompt),
            "after, sampled as the app's defaults (temperature 0.7, top-p 0.95)": native_profile(prompt, APP_DEFAULTS)}
    print(f"batch 1, {CONTEXT}-token context, {TOKENS} decode tokens, ms per token")
    print("| path | step | weights | attention | overhead | tok/s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step'] * 1e3:.2f} | {r['weights'] * 1e3:.2f} | {r['attention'] * 1e3:.2f} | "
              f"{r['overhead'] * 1e3:.2f} | {1 / r['step']:.1f} |")


if __name__ == "__main__":
    main()
