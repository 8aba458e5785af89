"""Concurrent streaming clients against the OpenAI API: total generated tokens/s and time to first token.

  python benchmarks/api_load.py                      # starts `localchat serve` (default model) on a free port
  python benchmarks/api_load.py --url http://127.0.0.1:8000 --clients 16 --max-tokens 128

Each client streams one chat completion (a shared system prompt, its own question, ignore_eos so
every reply has --max-tokens tokens) with the official openai client; all start together. Reported:
total generated tokens / wall time, TTFT p50/p95 (client side: request sent -> first content
chunk), and the same for one client alone measured in the same run (the ratio is what compares
across machines). The machine's load is recorded too: the 1-minute load average before the run
and the CPU busy share during it (/proc/stat, every process included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant. Answer the question clearly and in some detail, with examples."
TOPICS = ["owls", "rivers", "volcanoes", "bread", "bicycles", "tides", "bees", "glaciers", "comets", "tea",
          "bridges", "maps", "clocks", "coral reefs", "deserts", "lighthouses"]


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one(oa, model: str, i: int, max_tokens: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
    start = time.perf_counter()
    first = None
    usage = None
    stream = await oa.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.7,
                                              seed=i, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        usage = chunk.usage or usage
    end = time.perf_counter()
    return {"start": start, "ttft": (first or end) - start, "end": end, "tokens": usage.completion_tokens if usage else 0}


async def wave(url: str, model: str, clients: int, max_tokens: int) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("LOCALCHAT_API_KEY", "unused"),
                                  max_retries=0, timeout=1800) as oa:
        busy0, total0 = cpu_times()
        results = await asyncio.gather(*(one(oa, model, i, max_tokens) for i in range(clients)))
        busy1, total1 = cpu_times()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return {
        "clients": clients, "max_tokens": max_tokens, "wall_s": round(wall, 2), "generated_tokens": tokens,
        "total_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 3), "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "ttft_max_s": round(max(ttfts), 3), "ttft_mean_s": round(statistics.mean(ttfts), 3),
        "cpu_busy_share": round((busy1 - busy0) / (total1 - total0), 3) if total1 > total0 else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "localchat", "serve", "--port", str(port), *extra], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"localchat serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("localchat serve did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: start `localchat serve` here)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--serve-arg", action="append", default=[], help="extra flag for the started server (repeatable)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.serve_arg)
    try:
        headers = {"Authorization": f"Bearer {os.environ['LOCALCHAT_API_KEY']}"} if os.environ.get("LOCALCHAT_API_KEY") else {}
        model = httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        asyncio.run(wave(url, model, 1, 8))  # warm up: first-call costs are not the server's speed
        load_before = os.getloadavg()[0]
        alone = asyncio.run(wave(url, model, 1, args.max_tokens))
        together = asyncio.run(wave(url, model, args.clients, args.max_tokens))
        report = {"model": model, "cpus": os.cpu_count(), "loadavg_1min_before": round(load_before, 2),
                  "loadavg_1min_after": round(os.getloadavg()[0], 2), "alone": alone, "concurrent": together,
                  "throughput_vs_alone": round(together["total_tokens_per_s"] / alone["total_tokens_per_s"], 2)}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(report, indent=2))
    c = report["concurrent"]
    print(f"\n{c['clients']} concurrent streaming clients x {c['max_tokens']} tokens on {model}: "
          f"{c['total_tokens_per_s']} tok/s total ({report['throughput_vs_alone']}x one client alone), "
          f"TTFT p50 {c['ttft_p50_s']} s, p95 {c['ttft_p95_s']} s; load avg {report['loadavg_1min_before']} before, "
          f"CPU busy {c['cpu_busy_share']} during, {report['cpus']} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
