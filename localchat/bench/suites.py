"""`python -m localchat bench`: our engine against what users would run instead, side by side in one run.

Suites (see benchmarks/NOTES.md for what each measures and the figures on this machine):
  throughput  a seeded ShareGPT-like workload, all submitted at once, against transformers' `generate`
              in static padded batches (same dtype, same threads): generated tokens/s and the ratio
  decode      single-sequence decode tok/s against transformers and llama.cpp, also at a 1,000-token context,
              and the weight bytes a step streams
  quality     the GGUF's quantized weights against their float32 dequantization: greedy replies, perplexity
  sharing     n=4 sampling and beam width 4 on a long prompt: peak blocks with sharing against without
  multiturn   time to first token of turn k of a chat, prefix cache on against off
  memory      kv_utilization at the throughput run's peak against transformers' padded cache for the same batches
  page        one reply streaming in the app's page (Chromium) against `localchat generate`, memory panel
              closed and open; branch-click and regenerate latencies (localchat/bench/page.py)
llama-cpp-python, when installed, is run on the model's GGUF for decode and throughput; it is never a dependency.
"""

from __future__ import annotations

import gc
import importlib.util
import random
import statistics
import time
from typing import Callable

import torch

from localchat import settings
from localchat.bench.baselines import (
    cache_bytes,
    hf_generate_batch,
    llama_cpp_batched,
    llama_cpp_decode,
    llama_cpp_model,
    llama_cpp_throughput,
)
from localchat.bench.page import suite_page
from localchat.bench.quality import suite_quality
from localchat.bench.report import Report, cpu_times, loadavg, steal_share
from localchat.bench.workloads import BenchContext, Sizes, bench_params, make_workload, run_engine
from localchat.model.loader import dense_bytes_per_token

SUITES = ("throughput", "decode", "quality", "sharing", "multiturn", "memory", "page")


# ---- suites ------------------------------------------------------------------------------------


def suite_throughput(ctx: BenchContext, sizes: Sizes, report: Report, state: dict) -> None:
    work = make_workload(sizes, int(ctx.hf_config.vocab_size))
    total_out = sum(o for _, o in work)
    total_prompt = sum(len(p) for p, _ in work)
    engine = ctx.engine(
        kv_cache_gb=sizes.kv_cache_gb, max_num_seqs=max(64, sizes.num_requests),
        max_num_batched_tokens=sizes.max_num_batched_tokens,
    )
    # Warm-up (first-call allocations, oneDNN kernel selection) outside the timed run.
    run_engine(engine, [(work[0][0][:16], bench_params(4))])
    engine.block_manager.reset_prefix_cache()
    engine.block_manager.reset_peaks()
    steps0 = engine.steps
    seconds, finals = run_engine(engine, [(p, bench_params(o)) for p, o in work])
    generated = sum(len(f.outputs[0].token_ids) for f in finals.values())
    if generated != total_out:
        raise RuntimeError(f"throughput run generated {generated} tokens, expected {total_out}")
    ours = generated / seconds
    state["throughput_memory"] = engine.memory()
    state["throughput_ours_tok_s"] = ours
    report.details["throughput"] = {
        "requests": len(work), "prompt_tokens": total_prompt, "output_tokens": total_out, "seconds": seconds,
        "steps": engine.steps - steps0, "threads": torch.get_num_threads(), "dtype": str(ctx.dtype),
        "prompt_len_max": max(len(p) for p, _ in work), "output_len_max": max(o for _, o in work),
    }
    del engine
    gc.collect()

    if ctx.hf_model is not None:
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer is not None and ctx.tokenizer.pad_token_id is not None else 0
        hf_generate_batch(ctx.hf_model, [work[0][0][:16]], 2, pad)  # warm-up
        hf_seconds = 0.0
        padded_slots = 0
        real_tokens = 0
        cache_peak = 0
        for i in range(0, len(work), sizes.hf_batch):
            batch = work[i : i + sizes.hf_batch]
            new = max(o for _, o in batch)
            t0 = time.perf_counter()
            _, cache = hf_generate_batch(ctx.hf_model, [p for p, _ in batch], new, pad)
            hf_seconds += time.perf_counter() - t0
            width = max(len(p) for p, _ in batch)
            padded_slots += len(batch) * (width + new)
            real_tokens += sum(len(p) + o for p, o in batch)
            cache_peak = max(cache_peak, cache_bytes(cache))
            del cache
        hf = total_out / hf_seconds  # useful tokens: what each request asked for
        state["hf_memory"] = {"kv_bytes_peak": cache_peak, "kv_utilization": real_tokens / padded_slots}
        report.details["throughput"].update({"hf_seconds": hf_seconds, "hf_batch": sizes.hf_batch})
        report.add("throughput", "generated tokens/s", ours, hf, f"transformers generate (static batch {sizes.hf_batch})", "tok/s")
    else:
        report.add("throughput", "generated tokens/s", ours, None, "", "tok/s")

    llama = llama_cpp_model(ctx)
    if llama is not None:
        try:
            lc = llama_cpp_throughput(llama, work)
            report.add("throughput", "generated tokens/s", ours, lc, "llama.cpp (same GGUF, sequential)", "tok/s")
        except Exception as exc:  # pragma: no cover - depends on an optional package
            report.skipped["throughput/llama.cpp"] = f"{type(exc).__name__}: {exc}"

    for num_seqs in sizes.batched_seqs:
        _batched(ctx, sizes, report, num_seqs)


def _batched(ctx: BenchContext, sizes: Sizes, report: Report, num_seqs: int) -> None:
    """num_seqs requests of equal prompt and output length, generated together: total tokens/s."""
    rng = random.Random(3 + num_seqs)
    vocab = int(ctx.hf_config.vocab_size)
    prompts = [[rng.randrange(min(100, vocab // 4), vocab) for _ in range(sizes.batched_prompt)] for _ in range(num_seqs)]
    new = sizes.batched_tokens
    metric = f"{num_seqs} sequences x {new} tokens"
    engine = ctx.engine(kv_cache_gb=sizes.kv_cache_gb, max_num_seqs=max(64, num_seqs),
                        max_num_batched_tokens=sizes.max_num_batched_tokens)
    run_engine(engine, [(prompts[0][:8], bench_params(2))])  # warm-up
    engine.block_manager.reset_prefix_cache()
    seconds, _ = run_engine(engine, [(p, bench_params(new)) for p in prompts])
    ours = num_seqs * new / seconds
    del engine
    gc.collect()
    details = report.details.setdefault("throughput", {}).setdefault("batched", {})
    details[str(num_seqs)] = {"prompt_tokens": sizes.batched_prompt, "new_tokens": new, "seconds": seconds}
    baselines = 0
    if ctx.hf_model is not None:
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer is not None and ctx.tokenizer.pad_token_id is not None else 0
        t0 = time.perf_counter()
        hf_generate_batch(ctx.hf_model, prompts, new, pad)
        hf = num_seqs * new / (time.perf_counter() - t0)
        report.add("throughput", metric, ours, hf, f"transformers generate (batch {num_seqs})", "tok/s")
        baselines += 1
    if ctx.gguf_path is not None and importlib.util.find_spec("llama_cpp") is not None:
        try:
            lc = llama_cpp_batched(ctx.gguf_path, prompts, new)
            report.add("throughput", metric, ours, lc, f"llama.cpp batched ({num_seqs} sequences)", "tok/s")
            baselines += 1
        except Exception as exc:  # pragma: no cover - depends on an optional package
            report.skipped[f"throughput/llama.cpp batched {num_seqs}"] = f"{type(exc).__name__}: {exc}"
    if not baselines:
        report.add("throughput", metric, ours, None, "", "tok/s")


def suite_decode(ctx: BenchContext, sizes: Sizes, report: Report, state: dict) -> None:
    rng = random.Random(1)
    vocab = int(ctx.hf_config.vocab_size)
    prompt = [rng.randrange(min(100, vocab // 4), vocab) for _ in range(sizes.decode_prompt)]
    n = sizes.decode_tokens
    engine = ctx.engine(kv_cache_gb=0.1 if sizes.kv_cache_gb >= 0.1 else sizes.kv_cache_gb, enable_prefix_cache=False)
    run_engine(engine, [(prompt, bench_params(4))])  # warm-up
    runs = [_decode_once(engine, prompt, n) for _ in range(sizes.decode_repeats)]
    ours = statistics.median(r for r, _ in runs)
    ids_ours = runs[0][1]
    state["decode_ids_ours"] = ids_ours
    details = report.details["decode"] = {"prompt_tokens": len(prompt), "tokens": n, "runs_ours": [r for r, _ in runs],
                                          "weights": ctx.weights, "activations": ctx.activations}
    if ctx.hf_model is not None:
        hf_runs = [_hf_decode_once(ctx, prompt, n) for _ in range(sizes.decode_repeats)]
        ids_hf = hf_runs[0][1]
        agree = next((i for i, (a, b) in enumerate(zip(ids_ours, ids_hf)) if a != b), min(len(ids_ours), len(ids_hf)))
        details.update({"runs_transformers": [r for r, _ in hf_runs], "greedy_prefix_agreement": agree})
        report.add("decode", "single-sequence decode", ours, statistics.median(r for r, _ in hf_runs), "transformers generate", "tok/s")
    else:
        report.add("decode", "single-sequence decode", ours, None, "", "tok/s")
    _decode_llama_cpp(ctx, report, details, "single-sequence decode", ours, prompt, n, sizes.decode_repeats)
    # A chat in the page samples every token with the app's defaults: the same, sampled so by both.
    sampled = [_decode_once(engine, prompt, n, APP_SAMPLING)[0] for _ in range(sizes.decode_repeats)]
    details["runs_ours_sampled"] = sampled
    metric = f"single-sequence decode, temperature {APP_SAMPLING['temperature']} and top-p {APP_SAMPLING['top_p']}"
    if not _decode_llama_cpp(ctx, report, details, metric, statistics.median(sampled), prompt, n, sizes.decode_repeats,
                             "_sampled", {"temperature": APP_SAMPLING["temperature"], "top_p": APP_SAMPLING["top_p"]}):
        report.add("decode", metric, statistics.median(sampled), None, "", "tok/s")
    if ctx.activations != "float32":  # what rounding the matmuls' inputs buys (bench quality: what it costs)
        with ctx.float32_activations():
            exact = [_decode_once(engine, prompt, n)[0] for _ in range(sizes.decode_repeats)]
        details["runs_ours_float32_activations"] = exact
        report.add("decode", "single-sequence decode", ours, statistics.median(exact), "ours, float32 activations", "tok/s")
    # Decode slows as attention grows: the same at a long context.
    long_prompt = [rng.randrange(min(100, vocab // 4), vocab) for _ in range(sizes.decode_long_prompt)]
    long_runs = [_decode_once(engine, long_prompt, n)[0] for _ in range(sizes.decode_repeats)]
    details["runs_ours_long"] = long_runs
    metric = f"decode at a {sizes.decode_long_prompt:,}-token context"
    if not _decode_llama_cpp(ctx, report, details, metric, statistics.median(long_runs), long_prompt, n, sizes.decode_repeats, "_long"):
        report.add("decode", metric, statistics.median(long_runs), None, "", "tok/s")
    dense = dense_bytes_per_token(ctx.loaded.model)
    report.add("decode", "weight MB streamed per token", (ctx.loaded.weight_bytes_per_token or dense) / 1e6, dense / 1e6,
               f"the same weights dense ({str(ctx.dtype).removeprefix('torch.')})", "MB")
    del engine


# the app's default sampling (localchat/settings.py), seeded so that a run draws the same tokens
APP_SAMPLING = {"temperature": settings.DEFAULT_TEMPERATURE, "top_p": settings.DEFAULT_TOP_P, "seed": 1}


def _decode_once(engine, prompt: list[int], n: int, sampling: dict | None = None) -> tuple[float, list[int]]:
    req = engine.make_request(prompt_token_ids=prompt, params=bench_params(n, **(sampling or {})))
    engine.add(req)
    first = last = None
    while engine.has_unfinished():
        engine.step()
        last = time.perf_counter()
        # The step that samples the first token ends the prefill (a long prompt takes several chunked steps
        # before it); each step after it is one token.
        if first is None and req.seqs[0].output_token_ids:
            first = last
    return (n - 1) / (last - first), req.seqs[0].output_token_ids


def _hf_decode_once(ctx: BenchContext, prompt: list[int], n: int) -> tuple[float, list[int]]:
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer is not None and ctx.tokenizer.pad_token_id is not None else 0
    hf_generate_batch(ctx.hf_model, [prompt], 2, pad)  # warm
    t0 = time.perf_counter()
    hf_generate_batch(ctx.hf_model, [prompt], 1, pad)
    t1 = time.perf_counter()
    ids, _ = hf_generate_batch(ctx.hf_model, [prompt], n, pad)
    t2 = time.perf_counter()
    return (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9), ids[0].tolist()


def _decode_llama_cpp(ctx, report, details, metric, ours, prompt, n, repeats, suffix="", sampling=None) -> bool:
    llama = llama_cpp_model(ctx)
    if llama is None:
        return False
    try:
        runs = [llama_cpp_decode(llama, prompt, n, **(sampling or {})) for _ in range(repeats)]
    except Exception as exc:  # pragma: no cover - an optional baseline must not end the bench
        report.skipped[f"decode/llama.cpp{suffix}"] = f"{type(exc).__name__}: {exc}"
        return False
    details[f"runs_llama_cpp{suffix}"] = runs
    report.add("decode", metric, ours, statistics.median(runs), "llama.cpp (same GGUF)", "tok/s")
    return True


def suite_sharing(ctx: BenchContext, sizes: Sizes, report: Report, state: dict) -> None:
    rng = random.Random(2)
    vocab = int(ctx.hf_config.vocab_size)
    prompt = [rng.randrange(min(100, vocab // 4), vocab) for _ in range(sizes.sharing_prompt)]
    details = report.details.setdefault("sharing", {"prompt_tokens": len(prompt), "output_tokens": sizes.sharing_tokens})
    runs = [("n=4 sampling", bench_params(sizes.sharing_tokens, n=4, temperature=1.0, seed=0))]
    beam_error = _beam_search_unavailable()
    if beam_error is None:
        runs.append(("beam width 4", bench_params(sizes.sharing_tokens, beam_width=4)))
    else:
        report.skipped["sharing/beam width 4"] = beam_error
    for label, params in runs:
        engine = ctx.engine(kv_cache_gb=max(sizes.kv_cache_gb / 4, 0.01), enable_prefix_cache=False)
        engine.block_manager.reset_peaks()
        try:
            seconds, _ = run_engine(engine, [(prompt, params)])
        except Exception as exc:
            if label.startswith("beam"):
                report.skipped["sharing/beam width 4"] = f"{type(exc).__name__}: {exc}"
                continue
            raise
        mem = engine.memory()
        # The baseline is the same live sequences at our peak, each with its own blocks. (The unshared
        # count's own maximum can fall on a different instant: within a beam step the forked children
        # exist before the pruned beams are freed.)
        used, unshared = mem["blocks_used_peak"], mem["blocks_unshared_at_used_peak"]
        details[label] = {"blocks_used_peak": used, "blocks_unshared_at_used_peak": unshared,
                          "blocks_unshared_peak": mem["blocks_unshared_peak"],
                          "sharing_savings_peak": mem["sharing_savings_peak"], "seconds": seconds,
                          "cow_copies": mem.get("cow_copies")}
        report.add("sharing", f"{label}: peak blocks", used, unshared, "same sequences unshared", "blocks",
                   higher_is_better=False)
        report.add("sharing", f"{label}: sharing_savings", mem["sharing_savings_peak"], None)


def _beam_search_unavailable() -> str | None:
    try:
        import localchat.engine.beam_search  # noqa: F401
    except Exception as exc:
        return f"localchat.engine.beam_search does not import ({type(exc).__name__}: {exc})"
    return None


def suite_multiturn(ctx: BenchContext, sizes: Sizes, report: Report, state: dict) -> None:
    """Turn k's prompt = turn k-1's prompt + its reply ids + the template's ids for the new user message."""
    from localchat.model.chat_template import continuation_ids, prompt_ids

    tok = ctx.tokenizer
    rng = random.Random(3)
    words = ("the", "model", "cache", "block", "memory", "token", "prefix", "chat", "history", "engine", "reply",
             "question", "about", "why", "how", "does", "work", "when", "long", "short", "paged", "attention")

    def user_msg() -> str:
        return " ".join(rng.choice(words) for _ in range(sizes.multiturn_user_tokens))

    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": user_msg()}]
    prompt = prompt_ids(tok, messages)
    on = ctx.engine(kv_cache_gb=max(sizes.kv_cache_gb / 4, 0.01), enable_prefix_cache=True)
    off = ctx.engine(kv_cache_gb=max(sizes.kv_cache_gb / 4, 0.01), enable_prefix_cache=False)
    # Warm both so the first turn doesn't pay one-time costs: a prompt long enough for the dense path
    # (longer than localchat/model/native.py's NATIVE_MAX_TOKENS) as well as decode steps.
    for e in (on, off):
        run_engine(e, [(list(range(5, 5 + 96)), bench_params(2))])
    turns = []
    for k in range(sizes.multiturn_turns):
        params = bench_params(sizes.multiturn_reply_tokens)
        ttft = {}
        reply_ids = None
        for name, engine in (("on", on), ("off", off)):
            _, finals = run_engine(engine, [(prompt, params)])
            out = next(iter(finals.values()))
            ttft[name] = out.metrics.time_to_first_token
            if reply_ids is None:
                reply_ids = list(out.outputs[0].token_ids)
                hit = out.metrics.prefix_hit_tokens
        turns.append({"turn": k + 1, "prompt_tokens": len(prompt), "prefix_hit_tokens": hit, "ttft_on_s": ttft["on"], "ttft_off_s": ttft["off"]})
        report.add("multiturn", f"turn {k + 1} TTFT ({len(prompt)} tok)", ttft["on"], ttft["off"], "prefix cache off", "s",
                   higher_is_better=False)
        messages.append({"role": "assistant", "content": tok.decode(reply_ids, skip_special_tokens=True)})
        new = {"role": "user", "content": user_msg()}
        prompt = prompt + reply_ids + continuation_ids(tok, messages, reply_ids, [new])
        messages.append(new)
    report.details["multiturn"] = turns


def suite_memory(ctx: BenchContext, sizes: Sizes, report: Report, state: dict) -> None:
    if "throughput_memory" not in state:
        suite_throughput(ctx, sizes, report, state)
    mem = state["throughput_memory"]
    block_bytes = mem["kv_cache_bytes"] / max(mem["blocks_total"], 1)
    ours_bytes = mem["blocks_used_peak"] * block_bytes
    hf = state.get("hf_memory")
    report.add("memory", "kv_utilization at peak", mem["kv_utilization_peak"], hf["kv_utilization"] if hf else None,
               "transformers padded cache (all batches)" if hf else "")
    report.add("memory", "KV bytes at peak", ours_bytes / 2**20, hf["kv_bytes_peak"] / 2**20 if hf else None,
               f"transformers cache, static batch {sizes.hf_batch}" if hf else "", "MiB", higher_is_better=False,
               note="ours holds every request of the run at its peak; transformers one static batch")
    report.details["memory"] = {"ours": {k: mem[k] for k in ("blocks_used_peak", "tokens_stored_peak", "kv_utilization_peak", "blocks_total")},
                                "ours_kv_bytes_peak": ours_bytes, "transformers": hf}


SUITE_FUNCS: dict[str, Callable[[BenchContext, Sizes, Report, dict], None]] = {
    "throughput": suite_throughput,
    "decode": suite_decode,
    "quality": suite_quality,
    "sharing": suite_sharing,
    "multiturn": suite_multiturn,
    "memory": suite_memory,
    "page": suite_page,
}


# ---- entry points ------------------------------------------------------------------------------


def run_bench(ctx: BenchContext, suites: list[str], sizes: Sizes, log: Callable[[str], None] | None = None) -> Report:
    report = Report()
    state: dict = {}
    report.details["env"] = {
        "dtype": str(ctx.dtype), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": ctx.model_name, "load_avg": loadavg(),
        "llama_cpp": importlib.util.find_spec("llama_cpp") is not None,
    }
    if importlib.util.find_spec("llama_cpp") is None:
        report.skipped["llama.cpp"] = "llama-cpp-python is not installed (optional comparison)"
    first_ticks = cpu_times()
    for name in suites:
        started, ticks = time.perf_counter(), cpu_times()
        if log:
            log(f"[bench] {name} ...")
        SUITE_FUNCS[name](ctx, sizes, report, state)
        report.details.setdefault("suite_seconds", {})[name] = time.perf_counter() - started
        stolen = steal_share(ticks, cpu_times())
        report.details.setdefault("suite_steal", {})[name] = stolen
        if log:
            steal = f", steal {100 * stolen:.1f}%" if stolen is not None else ""
            log(f"[bench] {name} done in {time.perf_counter() - started:.1f} s (load {loadavg()}{steal})")
    report.details["env"]["load_avg_end"] = loadavg()
    report.details["env"]["steal"] = steal_share(first_ticks, cpu_times())
    return report


