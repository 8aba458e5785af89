"""`localchat bench`: the benchmark suites, side by side with their baselines (localchat/bench)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from localchat import settings
from localchat.cli.common import error


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from localchat.bench.report import loadavg as _loadavg
    from localchat.bench.suites import SUITES, run_bench
    from localchat.bench.workloads import Sizes, load_context

    suites = args.suites or list(SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        return error(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = Sizes.preset("quick" if args.quick else "full")
    if args.hf_batch:
        sizes.hf_batch = args.hf_batch
    started = time.perf_counter()
    try:
        ctx = load_context(args.model, args.dtype, args.weights, args.activations)
        ctx.engine_defaults["attention"] = args.attention
    except ValueError as exc:
        return error(str(exc))
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    log(f"[bench] model {ctx.model_name} weights {ctx.weights} activations {ctx.activations} dtype {ctx.dtype} threads {torch.get_num_threads()} load {_loadavg()}")
    report = run_bench(ctx, suites, sizes, log)
    report.details["total_seconds"] = time.perf_counter() - started
    print(report.table())
    print(f"weights {ctx.weights}, {ctx.activations} activations, dtype {ctx.dtype}, {torch.get_num_threads()} threads, load {report.details['env']['load_avg']} -> "
          f"{report.details['env']['load_avg_end']}{_steal(report.details['env'].get('steal'))}, {report.details['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2, default=str))
    return 0


def _steal(share: float | None) -> str:
    """The CPU the hypervisor gave to other machines while the bench ran (a shared machine's noise)."""
    return f", {100 * share:.1f}% of the CPU stolen" if share is not None else ""


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks against transformers (and llama.cpp when installed)")
    p.add_argument("suites", nargs="*", metavar="SUITE", help="any of throughput, decode, quality, sharing, multiturn, memory, page (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller workloads (about 3 minutes)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    p.add_argument("--weights", default=None, choices=("gguf", "bfloat16", "float32"),
                   help="gguf: the GGUF's own quantized weights (the default for a GGUF model); or dense weights")
    p.add_argument("--activations", default=None, choices=settings.ACTIVATIONS,
                   help="with gguf weights: what the quantized matmuls' inputs are (see generate --help)")
    p.add_argument("--dtype", default=None, help="dense weights' type, bfloat16 or float32 (default: the engine's default)")
    p.add_argument("--model", default=None, help="model name from models.yaml")
    p.add_argument("--attention", default="auto", choices=("auto", "torch", "triton"), help="paged-attention kernels (see generate --help)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both systems")
    p.add_argument("--hf-batch", type=int, default=None, help="transformers' static batch size")
    p.set_defaults(func=cmd_bench)
    return p
