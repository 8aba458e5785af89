"""Device check of the Triton backend (kernels/triton_ops.py) on a CUDA machine.

usage: python benchmarks/gpu_check.py [--budget SECONDS] [--skip STEP ...] [--json FILE]

Steps, each in a subprocess with its own timeout (within --budget overall), each reported whatever the
others do:
  tests       pytest tests/test_triton_kernels.py natively on the GPU (TRITON_INTERPRET removed)
  decode      decode attention, 256 sequences x 2048 context, 32 heads / 8 KV heads, head_dim 128, bfloat16,
              block 16: time per call, K/V bytes read per second, and that figure as a percentage of a
              device-to-device torch copy_ of the same bytes timed in the same run; split-K forced on and
              off besides the heuristic's choice; the output against torch_ops
  e2e         `localchat generate` greedy float32 on the default model with --attention triton --device cuda,
              its token ids against --attention torch --device cpu
  throughput  `localchat bench throughput --quick --attention triton`
A table of the steps comes last. Exit status: 0 when every step that ran passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "decode", "e2e", "throughput")
# Seconds each step may take at most (less when the overall budget runs short). The compile of each
# kernel variant takes a few seconds on first use, which the tests pay for some 40 variants.
STEP_LIMITS = {"tests": 240, "decode": 120, "e2e": 150, "throughput": 200}
DEFAULT_BUDGET = 470  # the whole script within ~8 minutes
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."

DECODE_SHAPE = {"seqs": 256, "context": 2048, "heads": 32, "kv_heads": 8, "head_dim": 128, "block_size": 16}


@dataclass
class StepResult:
    step: str
    status: str  # "ok", "FAIL", "skipped"
    seconds: float
    detail: str
    log_tail: str = ""


# ----------------------------------------------------------------------------------------- pure helpers


def parse_json_output(text: str) -> dict | None:
    """The last JSON object in a command's stdout (a document may follow log lines, or span many lines)."""
    decoder = json.JSONDecoder()
    found = None
    i = 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(obj, dict):
            found = obj
        i = end


def pytest_summary(text: str) -> str:
    """pytest's closing line ("25 passed in 12.3s"), without its ===== decoration."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip().strip("=").strip()
        if any(word in line for word in ("passed", "failed", "error", "skipped", "no tests ran")):
            return line
    return "no pytest summary"


def compare_ids(a: list[int], b: list[int]) -> tuple[bool, int | None]:
    """Whether two greedy id lists are equal, and the first position where they differ (None if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return False, i
    if len(a) != len(b):
        return False, min(len(a), len(b))
    return True, None


def bandwidth(num_bytes: int, seconds: float) -> float:
    """GB/s (1e9 bytes)."""
    return num_bytes / seconds / 1e9 if seconds > 0 else 0.0


def copy_percentage(kv_bytes: int, kernel_s: float, copy_s: float) -> float:
    """The kernel's K/V read rate as a percentage of copy_'s rate over the same number of bytes.

    A copy of N bytes reads N and writes N; its rate is counted as 2N / time (reads plus writes, as
    STREAM counts a copy), so 100% means the kernel moves memory as fast as the copy does.
    """
    return 100.0 * bandwidth(kv_bytes, kernel_s) / bandwidth(2 * kv_bytes, copy_s) if copy_s > 0 else 0.0


def decode_kv_bytes(seqs: int, context: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V one decode step reads: every context token's K and V rows once (GQA shares them)."""
    return 2 * seqs * context * kv_heads * head_dim * itemsize


def format_table(results: list[StepResult]) -> str:
    rows = [("step", "status", "seconds", "detail")] + [
        (r.step, r.status, f"{r.seconds:.1f}", r.detail) for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------- running


def native_env() -> dict:
    """The environment for native runs: no interpreter, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run(cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, stdout + stderr, seconds)."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=native_env(), capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - started
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return None, out + f"\n[timed out after {timeout:.0f} s]", time.perf_counter() - started


def step_tests(limit: float) -> StepResult:
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton_kernels.py", "-q", "-p", "no:cacheprovider"]
    rc, out, secs = run(cmd, limit)
    summary = pytest_summary(out) if rc is not None else f"timed out after {limit:.0f} s"
    return StepResult("tests", "ok" if rc == 0 else "FAIL", secs, summary, "" if rc == 0 else tail(out, 60))


def step_decode(limit: float) -> StepResult:
    rc, out, secs = run([sys.executable, str(Path(__file__).resolve()), "--decode-worker"], limit)
    doc = parse_json_output(out)
    if rc != 0 or doc is None or "error" in doc:
        why = (doc or {}).get("error") or (f"timed out after {limit:.0f} s" if rc is None else f"exit {rc}")
        return StepResult("decode", "FAIL", secs, why, tail(out))
    ok = doc["max_abs_err"] <= 3e-2
    detail = (
        f"{doc['ms']:.3f} ms, {doc['gbps']:.0f} GB/s = {doc['pct_of_copy']:.0f}% of copy_ "
        f"({doc['copy_gbps']:.0f} GB/s r+w); split {doc['split']} by heuristic; "
        f"forced split {doc['ms_split']:.3f} ms, no split {doc['ms_nosplit']:.3f} ms; "
        f"max err vs torch {doc['max_abs_err']:.2e}"
    )
    return StepResult("decode", "ok" if ok else "FAIL", secs, detail, "" if ok else tail(out))


def step_e2e(limit: float, prompt: str) -> StepResult:
    base = [sys.executable, "-m", "localchat", "generate", prompt, "--dtype", "float32", "--temperature", "0",
            "--max-tokens", "32", "--json"]
    # Both runs at once: the CPU one doesn't need the GPU, and the step's time is then the slower of the two.
    started = time.perf_counter()
    procs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("triton", ["--attention", "triton", "--device", "cuda"]), ("torch", ["--attention", "torch", "--device", "cpu"])):
            log = open(Path(tmp) / f"{name}.log", "w+")
            procs[name] = (subprocess.Popen(base + extra, cwd=ROOT, env=native_env(), stdout=log, stderr=subprocess.STDOUT, text=True), log)
        outputs, codes = {}, {}
        for name, (proc, log) in procs.items():
            try:
                codes[name] = proc.wait(timeout=max(1.0, limit - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
            log.seek(0)
            outputs[name] = log.read()
            log.close()
    secs = time.perf_counter() - started
    logs = "\n".join(f"--- {n} (exit {codes[n]})\n{tail(outputs[n], 20)}" for n in outputs)
    ids = {}
    for name in outputs:
        doc = parse_json_output(outputs[name]) if codes[name] == 0 else None
        try:
            ids[name] = list(doc["outputs"][0]["token_ids"])
        except (TypeError, KeyError, IndexError):
            what = "timed out" if codes[name] is None else f"exit {codes[name]}" if codes[name] else "no token ids in its JSON"
            return StepResult("e2e", "FAIL", secs, f"--attention {name}: {what}", logs)
    equal, first = compare_ids(ids["triton"], ids["torch"])
    if equal:
        return StepResult("e2e", "ok", secs, f"{len(ids['triton'])} greedy ids equal (triton/cuda vs torch/cpu)")
    return StepResult("e2e", "FAIL", secs, f"greedy ids differ from position {first} of {len(ids['torch'])}", logs)


def step_throughput(limit: float) -> StepResult:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "localchat", "bench", "throughput", "--quick", "--attention", "triton", "--json", str(report)]
        rc, out, secs = run(cmd, limit)
        doc = json.loads(report.read_text()) if rc == 0 and report.exists() else None
    if doc is None:
        return StepResult("throughput", "FAIL", secs, "timed out" if rc is None else f"exit {rc}", tail(out))
    figures = []
    for row in doc.get("rows", []):
        if row.get("suite") == "throughput" and row.get("ours") is not None:
            text = f"{row['metric']} {row['ours']:.0f}"
            if row.get("baseline") is not None:
                text += f" vs {row['baseline']:.0f} ({row['baseline_name']})"
            figures.append(text)
    return StepResult("throughput", "ok", secs, "; ".join(figures) or "no throughput rows")


def decode_worker() -> int:
    """Step `decode`, in its own process so a CUDA fault can't take the other steps with it."""
    try:
        import torch

        from kernels import build_metadata, torch_ops, triton_ops

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        torch.manual_seed(0)
        s = DECODE_SHAPE
        seqs, ctx, heads, kv_heads, dim, block = (s[k] for k in ("seqs", "context", "heads", "kv_heads", "head_dim", "block_size"))
        dtype, dev = torch.bfloat16, torch.device("cuda")
        per_seq = -(-ctx // block)
        num_blocks = seqs * per_seq + 1
        k_cache = torch.randn(num_blocks, block, kv_heads, dim, dtype=dtype, device=dev)
        v_cache = torch.randn(num_blocks, block, kv_heads, dim, dtype=dtype, device=dev)
        # Shuffled physical blocks, as a long-running pool ends up.
        tables = (torch.randperm(num_blocks - 1) + 1).view(seqs, per_seq).tolist()
        meta = build_metadata(tables, [ctx] * seqs, [1] * seqs, block, device=dev)
        query = torch.randn(seqs, heads, dim, dtype=dtype, device=dev)
        out = torch.empty_like(query)
        scale = dim**-0.5

        def timed(fn, iters: int = 20) -> float:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return sorted(times)[len(times) // 2]

        t_auto = timed(lambda: triton_ops.paged_attention(query, k_cache, v_cache, meta, scale, out=out))
        t_split = timed(lambda: triton_ops.paged_attention(query, k_cache, v_cache, meta, scale, out=out, split_k=True))
        t_nosplit = timed(lambda: triton_ops.paged_attention(query, k_cache, v_cache, meta, scale, out=out, split_k=False))
        triton_ops.paged_attention(query, k_cache, v_cache, meta, scale, out=out)
        expected = torch_ops.paged_attention(query, k_cache, v_cache, meta, scale)
        err = (out.float() - expected.float()).abs().max().item()
        del expected

        kv_bytes = decode_kv_bytes(seqs, ctx, kv_heads, dim, k_cache.element_size())
        src = torch.empty(kv_bytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        src.fill_(1)
        t_copy = timed(lambda: dst.copy_(src))
        doc = {
            "shape": s, "kv_bytes": kv_bytes, "ms": t_auto * 1e3, "ms_split": t_split * 1e3, "ms_nosplit": t_nosplit * 1e3,
            "split": triton_ops.use_split_k(seqs, kv_heads, ctx, dev), "gbps": bandwidth(kv_bytes, t_auto),
            "copy_ms": t_copy * 1e3, "copy_gbps": bandwidth(2 * kv_bytes, t_copy),
            "pct_of_copy": copy_percentage(kv_bytes, t_auto, t_copy), "max_abs_err": err,
            "device": torch.cuda.get_device_name(dev),
        }
    except Exception as exc:  # reported in the table, with the traceback above it
        import traceback

        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}))
        return 1
    print(json.dumps(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all steps together")
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the e2e step's prompt")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--decode-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.decode_worker:
        return decode_worker()

    deadline = time.perf_counter() + args.budget
    results: list[StepResult] = []
    for name in STEPS:
        left = deadline - time.perf_counter()
        if name in args.skip or left < 10:
            results.append(StepResult(name, "skipped", 0.0, "--skip" if name in args.skip else "out of budget"))
            continue
        limit = min(STEP_LIMITS[name], left)
        print(f"[gpu_check] {name} (up to {limit:.0f} s) ...", flush=True)
        started = time.perf_counter()
        try:
            if name == "tests":
                result = step_tests(limit)
            elif name == "decode":
                result = step_decode(limit)
            elif name == "e2e":
                result = step_e2e(limit, args.prompt)
            else:
                result = step_throughput(limit)
        except Exception as exc:  # a broken step must not stop the others
            result = StepResult(name, "FAIL", time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
        results.append(result)
        print(f"[gpu_check] {name}: {result.status} in {result.seconds:.1f} s: {result.detail}", flush=True)
        if result.log_tail:
            print(result.log_tail, flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    print()
    print(format_table(results))
    return 0 if all(r.status != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
