"""`python -m localchat bench`: our engine against what users would run instead, side by side in one run.

Suites (see benchmarks/NOTES.md for what each measures and the figures on this machine):
  throughput  a seeded ShareGPT-like workload, all submitted at once, against transformers' `generate`
              in static padded batches (same dtype, same threads): generated tokens/s and the ratio
  decode      single-sequence decode tok/s against transformers
  sharing     n=4 sampling and beam width 4 on a long prompt: peak blocks with sharing against without
  multiturn   time to first token of turn k of a chat, prefix cache on against off
  memory      kv_utilization at the throughput run's peak against transformers' padded cache for the same batches
llama-cpp-python, when installed, is run on the model's GGUF for decode and throughput; it is never a dependency.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

SUITES = ("throughput", "decode", "sharing", "multiturn", "memory")


# ---- sizes -------------------------------------------------------------------------------------


@dataclass
class Sizes:
    num_requests: int = 64
    prompt_range: tuple[int, int] = (16, 1500)
    output_range: tuple[int, int] = (16, 512)
    hf_batch: int = 16
    decode_prompt: int = 32
    decode_tokens: int = 256
    decode_repeats: int = 3  # each side's figure is the median of this many runs (one noisy run can't decide it)
    sharing_prompt: int = 1000
    sharing_tokens: int = 128
    multiturn_turns: int = 8
    multiturn_user_tokens: int = 150
    multiturn_reply_tokens: int = 32
    kv_cache_gb: float = 1.5
    max_num_batched_tokens: int = 1024
    # Equal-length batches generated together (llama.cpp's batched figure in design.md is of this kind).
    batched_seqs: tuple[int, ...] = (8, 64)
    batched_prompt: int = 128
    batched_tokens: int = 128

    @classmethod
    def preset(cls, name: str) -> "Sizes":
        if name == "full":
            return cls()
        if name == "quick":
            return cls(
                num_requests=24, prompt_range=(16, 600), output_range=(16, 128), hf_batch=8, decode_tokens=64,
                sharing_prompt=500, sharing_tokens=32, multiturn_turns=5, multiturn_user_tokens=100,
                multiturn_reply_tokens=16, kv_cache_gb=0.5, batched_seqs=(8,), batched_prompt=64, batched_tokens=64,
            )
        if name == "tiny":  # the smoke test's tiny model: seconds
            return cls(
                num_requests=6, prompt_range=(4, 40), output_range=(2, 12), hf_batch=4, decode_prompt=8,
                decode_tokens=8, decode_repeats=1, sharing_prompt=40, sharing_tokens=6, multiturn_turns=3, multiturn_user_tokens=12,
                multiturn_reply_tokens=4, kv_cache_gb=0.01, max_num_batched_tokens=64, batched_seqs=(2,),
                batched_prompt=6, batched_tokens=4,
            )
        raise ValueError(f"unknown size preset {name!r}")


# ---- what a bench runs on ----------------------------------------------------------------------


@dataclass
class BenchContext:
    model: Any  # localchat LlamaForCausalLM
    hf_config: Any
    tokenizer: Any
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int]
    hf_model: Any = None  # transformers model on the same weights and dtype (the baseline)
    gguf_path: str | None = None  # for llama.cpp, when it is installed
    model_name: str = ""

    def engine(self, **config: Any):
        from localchat.engine import Engine, EngineConfig

        return Engine(
            self.model, self.hf_config, self.tokenizer, dtype=self.dtype, device=self.device,
            config=EngineConfig(**config), model_name=self.model_name, eos_token_ids=self.eos_token_ids,
        )


def load_context(model_name: str | None, dtype: torch.dtype | str | None) -> BenchContext:
    from transformers import AutoModelForCausalLM

    from localchat.engine import default_dtype
    from localchat.models import load_model, parse_dtype

    torch_dtype = parse_dtype(dtype) if dtype else default_dtype("cpu")
    loaded = load_model(model_name, dtype=torch_dtype, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch_dtype).eval()
    return BenchContext(
        model=loaded.model, hf_config=loaded.config, tokenizer=loaded.tokenizer, dtype=torch_dtype,
        device=loaded.device, eos_token_ids=loaded.eos_token_ids, hf_model=hf, gguf_path=_find_gguf(loaded.spec),
        model_name=loaded.spec.name,
    )


def _find_gguf(spec) -> str | None:
    try:
        from localchat.models import _source_dir

        if spec.gguf_file:
            path = _source_dir(spec) / spec.gguf_file
            if path.exists():
                return str(path)
    except Exception:
        pass
    return None


# ---- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    suite: str
    metric: str
    ours: float | None
    baseline: float | None = None
    baseline_name: str = ""
    unit: str = ""
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline is None:
            return None
        if self.higher_is_better:
            return self.ours / self.baseline if self.baseline else None
        return self.baseline / self.ours if self.ours else None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def get(self, suite: str, metric: str, baseline_name: str | None = None) -> Row | None:
        for r in self.rows:
            if r.suite == suite and r.metric == metric and (baseline_name is None or r.baseline_name == baseline_name):
                return r
        return None

    def as_dict(self) -> dict:
        return {
            "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows],
            "details": self.details,
            "skipped": self.skipped,
        }

    def table(self) -> str:
        head = ("suite", "metric", "ours", "baseline", "vs", "ratio")
        lines = [head]
        for r in self.rows:
            lines.append((
                r.suite, r.metric + (f" [{r.unit}]" if r.unit else ""), _fmt(r.ours), _fmt(r.baseline),
                r.baseline_name, f"{r.ratio:.2f}x" if r.ratio is not None else "",
            ))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        out = []
        for n, line in enumerate(lines):
            out.append("  ".join(str(c).ljust(w) if i < 2 or i == 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        for suite, why in self.skipped.items():
            out.append(f"skipped {suite}: {why}")
        return "\n".join(out)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or (abs(x) >= 100 and float(x).is_integer()):
        return f"{int(x)}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


# ---- workload ----------------------------------------------------------------------------------


def _spread(rng: random.Random, lo: int, hi: int, median: float) -> int:
    """Log-normal lengths clipped to [lo, hi] (ShareGPT's prompts and replies are heavy-tailed)."""
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), 0.9)))))


def make_workload(sizes: Sizes, vocab_size: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request; seeded, so every run and every system gets the same."""
    rng = random.Random(seed)
    lo_p, hi_p = sizes.prompt_range
    lo_o, hi_o = sizes.output_range
    work = []
    # Avoid the lowest ids (special tokens in most vocabularies).
    first = min(100, vocab_size // 4)
    for _ in range(sizes.num_requests):
        plen = _spread(rng, lo_p, hi_p, median=(lo_p * hi_p) ** 0.5 * 1.2)
        olen = _spread(rng, lo_o, hi_o, median=(lo_o * hi_o) ** 0.5)
        work.append(([rng.randrange(first, vocab_size) for _ in range(plen)], olen))
    return work


def _params(max_tokens: int, **kw: Any):
    from localchat.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), ignore_eos=True, **kw)


def _run_engine(engine, items: list[tuple[list[int], Any]]) -> tuple[float, dict[str, Any]]:
    """Submit every request at once and step to completion; returns (seconds, final outputs by id)."""
    reqs = [engine.make_request(prompt_token_ids=ids, params=p) for ids, p in items]
    t0 = time.perf_counter()
    for r in reqs:
        engine.add(r)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return time.perf_counter() - t0, finals


# ---- transformers baseline ---------------------------------------------------------------------


def hf_generate_batch(hf_model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[torch.Tensor, Any]:
    """Static batch as users run it: left padding to the longest prompt, every row runs `new_tokens` steps."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=pad_id, return_dict_in_generate=True, use_cache=True,
        )
    return out.sequences[:, width:], out.past_key_values


def _cache_bytes(cache: Any) -> int:
    total = 0
    seen: set[int] = set()

    def visit(obj: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 4 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
            return
        if isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth + 1)
            return
        layers = getattr(obj, "layers", None)
        if layers is not None:
            for layer in layers:
                visit(getattr(layer, "keys", None), depth + 1)
                visit(getattr(layer, "values", None), depth + 1)
            return
        for name in ("key_cache", "value_cache"):
            visit(getattr(obj, name, None), depth + 1)

    visit(cache)
    return total


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
    _run_engine(engine, [(work[0][0][:16], _params(4))])
    engine.block_manager.reset_prefix_cache()
    engine.block_manager.reset_peaks()
    steps0 = engine.steps
    seconds, finals = _run_engine(engine, [(p, _params(o)) for p, o in work])
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
            cache_peak = max(cache_peak, _cache_bytes(cache))
            del cache
        hf = total_out / hf_seconds  # useful tokens: what each request asked for
        state["hf_memory"] = {"kv_bytes_peak": cache_peak, "kv_utilization": real_tokens / padded_slots}
        report.details["throughput"].update({"hf_seconds": hf_seconds, "hf_batch": sizes.hf_batch})
        report.add("throughput", "generated tokens/s", ours, hf, f"transformers generate (static batch {sizes.hf_batch})", "tok/s")
    else:
        report.add("throughput", "generated tokens/s", ours, None, "", "tok/s")

    llama = _llama_cpp(ctx)
    if llama is not None:
        try:
            lc = _llama_cpp_throughput(llama, work)
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
    _run_engine(engine, [(prompts[0][:8], _params(2))])  # warm-up
    engine.block_manager.reset_prefix_cache()
    seconds, _ = _run_engine(engine, [(p, _params(new)) for p in prompts])
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
            lc = _llama_cpp_batched(ctx.gguf_path, prompts, new)
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
    _run_engine(engine, [(prompt, _params(4))])  # warm-up

    def ours_once() -> tuple[float, list[int]]:
        req = engine.make_request(prompt_token_ids=prompt, params=_params(n))
        engine.add(req)
        stamps = []
        while engine.has_unfinished():
            engine.step()
            stamps.append(time.perf_counter())
        # stamps[0] ends the prefill step (which samples the first token); the rest are one token each.
        return (n - 1) / (stamps[-1] - stamps[0]), req.seqs[0].output_token_ids

    runs = [ours_once() for _ in range(sizes.decode_repeats)]
    ours = statistics.median(r for r, _ in runs)
    ids_ours = runs[0][1]
    del engine
    state["decode_ids_ours"] = ids_ours
    details = report.details["decode"] = {"prompt_tokens": len(prompt), "tokens": n, "runs_ours": [r for r, _ in runs]}
    if ctx.hf_model is not None:
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer is not None and ctx.tokenizer.pad_token_id is not None else 0
        hf_generate_batch(ctx.hf_model, [prompt], 4, pad)

        def hf_once() -> tuple[float, list[int]]:
            t0 = time.perf_counter()
            hf_generate_batch(ctx.hf_model, [prompt], 1, pad)
            t1 = time.perf_counter()
            ids, _ = hf_generate_batch(ctx.hf_model, [prompt], n, pad)
            t2 = time.perf_counter()
            return (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9), ids[0].tolist()

        hf_runs = [hf_once() for _ in range(sizes.decode_repeats)]
        hf = statistics.median(r for r, _ in hf_runs)
        ids_hf = hf_runs[0][1]
        agree = next((i for i, (a, b) in enumerate(zip(ids_ours, ids_hf)) if a != b), min(len(ids_ours), len(ids_hf)))
        details.update({"runs_transformers": [r for r, _ in hf_runs], "greedy_prefix_agreement": agree})
        report.add("decode", "single-sequence decode", ours, hf, "transformers generate", "tok/s")
    else:
        report.add("decode", "single-sequence decode", ours, None, "", "tok/s")
    llama = _llama_cpp(ctx)
    if llama is not None:
        try:
            lc_runs = [_llama_cpp_decode(llama, prompt, n) for _ in range(sizes.decode_repeats)]
            details["runs_llama_cpp"] = lc_runs
            report.add("decode", "single-sequence decode", ours, statistics.median(lc_runs), "llama.cpp (same GGUF)", "tok/s")
        except Exception as exc:  # pragma: no cover
            report.skipped["decode/llama.cpp"] = f"{type(exc).__name__}: {exc}"


def suite_sharing(ctx: BenchContext, sizes: Sizes, report: Report, state: dict) -> None:
    rng = random.Random(2)
    vocab = int(ctx.hf_config.vocab_size)
    prompt = [rng.randrange(min(100, vocab // 4), vocab) for _ in range(sizes.sharing_prompt)]
    details = report.details.setdefault("sharing", {"prompt_tokens": len(prompt), "output_tokens": sizes.sharing_tokens})
    runs = [("n=4 sampling", _params(sizes.sharing_tokens, n=4, temperature=1.0, seed=0))]
    beam_error = _beam_search_unavailable()
    if beam_error is None:
        runs.append(("beam width 4", _params(sizes.sharing_tokens, beam_width=4)))
    else:
        report.skipped["sharing/beam width 4"] = beam_error
    for label, params in runs:
        engine = ctx.engine(kv_cache_gb=max(sizes.kv_cache_gb / 4, 0.01), enable_prefix_cache=False)
        engine.block_manager.reset_peaks()
        try:
            seconds, _ = _run_engine(engine, [(prompt, params)])
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
        import localchat.beam_search  # noqa: F401
    except Exception as exc:
        return f"localchat.beam_search does not import ({type(exc).__name__}: {exc})"
    return None


def suite_multiturn(ctx: BenchContext, sizes: Sizes, report: Report, state: dict) -> None:
    """Turn k's prompt = turn k-1's prompt + its reply ids + the template's ids for the new user message."""
    from localchat.chat_format import continuation_ids

    tok = ctx.tokenizer
    rng = random.Random(3)
    words = ("the", "model", "cache", "block", "memory", "token", "prefix", "chat", "history", "engine", "reply",
             "question", "about", "why", "how", "does", "work", "when", "long", "short", "paged", "attention")

    def user_msg() -> str:
        return " ".join(rng.choice(words) for _ in range(sizes.multiturn_user_tokens))

    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": user_msg()}]
    prompt = list(tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"])
    on = ctx.engine(kv_cache_gb=max(sizes.kv_cache_gb / 4, 0.01), enable_prefix_cache=True)
    off = ctx.engine(kv_cache_gb=max(sizes.kv_cache_gb / 4, 0.01), enable_prefix_cache=False)
    # Warm both so the first turn doesn't pay one-time costs.
    for e in (on, off):
        _run_engine(e, [([5, 6, 7, 8], _params(2))])
    turns = []
    for k in range(sizes.multiturn_turns):
        params = _params(sizes.multiturn_reply_tokens)
        ttft = {}
        reply_ids = None
        for name, engine in (("on", on), ("off", off)):
            _, finals = _run_engine(engine, [(prompt, params)])
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
    "sharing": suite_sharing,
    "multiturn": suite_multiturn,
    "memory": suite_memory,
}


# ---- llama.cpp (optional) ----------------------------------------------------------------------


def _llama_cpp(ctx: BenchContext):
    if ctx.gguf_path is None or importlib.util.find_spec("llama_cpp") is None:
        return None
    cached = getattr(ctx, "_llama", None)
    if cached is None:
        from llama_cpp import Llama  # type: ignore

        cached = Llama(model_path=ctx.gguf_path, n_ctx=4096, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
        ctx._llama = cached  # type: ignore[attr-defined]
    return cached


def _llama_cpp_generate(llama, prompt: list[int], n: int) -> int:
    llama.reset()
    count = 0
    for _ in llama.generate(prompt, temp=0.0, reset=True):
        count += 1
        if count >= n:
            break
    return count


def _llama_cpp_decode(llama, prompt: list[int], n: int) -> float:
    _llama_cpp_generate(llama, prompt, 2)
    t0 = time.perf_counter()
    _llama_cpp_generate(llama, prompt, 1)
    t1 = time.perf_counter()
    _llama_cpp_generate(llama, prompt, n)
    t2 = time.perf_counter()
    return (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9)


def _llama_cpp_throughput(llama, work: list[tuple[list[int], int]]) -> float:
    # llama-cpp-python's high-level API serves one sequence at a time; that is how users run it.
    t0 = time.perf_counter()
    total = sum(_llama_cpp_generate(llama, p[:4000], o) for p, o in work)
    return total / (time.perf_counter() - t0)


def _quiet_llama_cpp():
    """llama.cpp logs every tensor it loads to stderr; its Python package mutes that this way."""
    try:
        from llama_cpp._utils import suppress_stdout_stderr  # type: ignore

        return suppress_stdout_stderr(disable=False)
    except ImportError:  # pragma: no cover
        from contextlib import nullcontext

        return nullcontext()


def _llama_cpp_batched(gguf_path: str, prompts: list[list[int]], new_tokens: int) -> float:
    """llama.cpp's own batched decoding (one context, a sequence id per request, greedy): total tokens/s.

    llama-cpp-python's high-level API runs one sequence, so this drives the C API as llama.cpp's
    `batched` example does: one llama_decode for all prompts, then one per step with a token per sequence.
    """
    import itertools

    import llama_cpp  # type: ignore
    import numpy as np

    n = len(prompts)
    with _quiet_llama_cpp():
        llama_cpp.llama_backend_init()
        model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), llama_cpp.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = sum(len(p) for p in prompts) + n * (new_tokens + 1)
        ctx_params.n_batch = max(ctx_params.n_ctx, 512)
        ctx_params.n_ubatch = 512
        ctx_params.n_seq_max = n
        ctx_params.n_threads = ctx_params.n_threads_batch = torch.get_num_threads()
        lctx = llama_cpp.llama_init_from_model(model, ctx_params)
        batch = llama_cpp.llama_batch_init(max(ctx_params.n_ctx, n), 0, 1)
        try:
            vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

            def decode(items: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
                batch.n_tokens = len(items)
                for i, (tok, pos, seq, logits) in enumerate(items):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = logits
                if llama_cpp.llama_decode(lctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")

            def greedy(index: int) -> int:
                ptr = llama_cpp.llama_get_logits_ith(lctx, index)
                return int(np.ctypeslib.as_array(ptr, shape=(vocab,)).argmax())

            t0 = time.perf_counter()
            decode([(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)])
            tokens = [greedy(end - 1) for end in itertools.accumulate(len(p) for p in prompts)]
            for step in range(1, new_tokens):
                decode([(tokens[s], len(prompts[s]) - 1 + step, s, True) for s in range(n)])
                tokens = [greedy(s) for s in range(n)]
            return n * new_tokens / (time.perf_counter() - t0)
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(lctx)
            llama_cpp.llama_model_free(model)


# ---- entry points ------------------------------------------------------------------------------


def run_bench(ctx: BenchContext, suites: list[str], sizes: Sizes, log: Callable[[str], None] | None = None) -> Report:
    report = Report()
    state: dict = {}
    report.details["env"] = {
        "dtype": str(ctx.dtype), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": ctx.model_name, "load_avg": _loadavg(),
        "llama_cpp": importlib.util.find_spec("llama_cpp") is not None,
    }
    if importlib.util.find_spec("llama_cpp") is None:
        report.skipped["llama.cpp"] = "llama-cpp-python is not installed (optional comparison)"
    for name in suites:
        started = time.perf_counter()
        if log:
            log(f"[bench] {name} ...")
        SUITE_FUNCS[name](ctx, sizes, report, state)
        report.details.setdefault("suite_seconds", {})[name] = time.perf_counter() - started
        if log:
            log(f"[bench] {name} done in {time.perf_counter() - started:.1f} s (load {_loadavg()})")
    report.details["env"]["load_avg_end"] = _loadavg()
    return report


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cmd_bench(args: argparse.Namespace) -> int:
    suites = args.suites or list(SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(f"error: unknown suite(s) {unknown}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = Sizes.preset("quick" if args.quick else "full")
    if args.hf_batch:
        sizes.hf_batch = args.hf_batch
    started = time.perf_counter()
    try:
        ctx = load_context(args.model, args.dtype)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    log(f"[bench] model {ctx.model_name} dtype {ctx.dtype} threads {torch.get_num_threads()} load {_loadavg()}")
    report = run_bench(ctx, suites, sizes, log)
    report.details["total_seconds"] = time.perf_counter() - started
    print(report.table())
    print(f"dtype {ctx.dtype}, {torch.get_num_threads()} threads, load {report.details['env']['load_avg']} -> "
          f"{report.details['env']['load_avg_end']}, {report.details['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2, default=str))
    return 0


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks against transformers (and llama.cpp when installed)")
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller workloads (about 3 minutes)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the engine's default)")
    p.add_argument("--model", default=None, help="model name from models.yaml")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both systems")
    p.add_argument("--hf-batch", type=int, default=None, help="transformers' static batch size")
    p.set_defaults(func=cmd_bench)
    return p
