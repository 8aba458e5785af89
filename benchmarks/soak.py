"""Soak: API clients asking for n samples, without a pause, for a long time; then what was served, what
failed, what leaked.

  python benchmarks/soak.py                          # 8 clients, n=4, 10 minutes on `localchat serve` (default model)
  python benchmarks/soak.py --minutes 2 --clients 4 --json soak.json
  python benchmarks/soak.py --app                    # against `localchat app` (the API on the page's port)
  python benchmarks/soak.py --url http://127.0.0.1:8000

Each client loops: a chat completion with n samples (forks of one prefilled prompt), streamed or whole
at random, on one of a few shared system prompts (prefix-cache hits) with its own question, max_tokens
16-96; one request in ten is dropped by the client after a few chunks (its blocks must come back).
Reported: requests served, errors (any non-200, a broken stream, a reply without n choices: target 0),
client drops, tokens, the server's KV blocks still used once it is idle (leaked: target 0), and the
resident memory (RSS) of the server and its engine process at the start (after a warm-up request)
and at the end. Not part of the test run (it takes minutes); its figures go in the closing notes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

SYSTEMS = ["You are a helpful assistant.", "You are a patient teacher. Explain step by step.",
           "You answer in one short paragraph."]
TOPICS = ["owls", "rivers", "volcanoes", "bread", "bicycles", "tides", "bees", "glaciers", "comets", "tea",
          "bridges", "maps", "clocks", "coral reefs", "deserts", "lighthouses"]


def start_server(extra: list[str], *, app: bool) -> tuple[subprocess.Popen, str]:
    """`localchat serve` (or `app`) on a free port of 127.0.0.1, once it answers /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = "app" if app else "serve"
    proc = subprocess.Popen([sys.executable, "-m", "localchat", command, "--port", str(port), *extra], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"localchat {command} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"localchat {command} did not start")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (the engine's process), from /proc."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Tally:
    def __init__(self) -> None:
        self.served = self.errors = self.dropped = self.tokens = 0
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what[:300])


async def one_request(client: httpx.AsyncClient, url: str, model: str, rng: random.Random, n: int, tally: Tally) -> None:
    body = {"model": model, "n": n, "max_tokens": rng.randint(16, 96), "temperature": 0.8, "seed": rng.randrange(10**6),
            "messages": [{"role": "system", "content": rng.choice(SYSTEMS)},
                         {"role": "user", "content": f"Tell me about {rng.choice(TOPICS)} ({rng.randrange(1000)})."}]}
    stream, drop = rng.random() < 0.5, rng.random() < 0.1
    if not stream:
        response = await client.post(url + "/v1/chat/completions", json=body)
        doc = response.json()
        if response.status_code != 200 or len(doc.get("choices", [])) != n:
            tally.error(f"{response.status_code}: {response.text}")
            return
        tally.served += 1
        tally.tokens += doc["usage"]["completion_tokens"]
        return
    body.update(stream=True, stream_options={"include_usage": True})
    chunks, usage, done, indexes = 0, None, False, set()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            tally.error(f"{response.status_code}: {(await response.aread()).decode(errors='replace')}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            doc = json.loads(line[6:])
            if "error" in doc:
                tally.error(json.dumps(doc))
                return
            chunks += 1
            indexes.update(c["index"] for c in doc.get("choices", []))
            usage = doc.get("usage") or usage
            if drop and chunks >= 3:
                tally.dropped += 1  # closing the stream here: the server aborts the request
                return
    if not done or usage is None or indexes != set(range(n)):
        tally.error(f"stream ended early: done={done} usage={usage} choices={sorted(indexes)}")
        return
    tally.served += 1
    tally.tokens += usage["completion_tokens"]


async def client_loop(url: str, model: str, seed: int, n: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600) as client:
        while time.monotonic() < deadline:
            try:
                await one_request(client, url, model, rng, n, tally)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                tally.error(f"{type(exc).__name__}: {exc}")


async def soak(url: str, model: str, clients: int, n: int, seconds: float, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(url, model, seed, n, deadline, tally) for seed in range(clients)))


def wait_idle(url: str, timeout: float = 120) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m.get("localchat:num_requests_running", 0) == 0 and m.get("localchat:num_requests_waiting", 0) == 0) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--app", action="store_true", help="start `localchat app` (page and API) instead of `localchat serve`")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra flag for the started server (repeatable)")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.serve_arg, app=args.app)
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        warm = Tally()
        asyncio.run(soak(url, model, 1, args.n, 0.1, warm))  # one request: first-call costs are paid before RSS is read
        rss_start = rss_bytes(proc.pid) if proc else None
        tally, started = Tally(), time.monotonic()
        asyncio.run(soak(url, model, args.clients, args.n, args.minutes * 60, tally))
        wall = time.monotonic() - started
        idle = wait_idle(url)
        rss_end = rss_bytes(proc.pid) if proc else None
        report = {
            "model": model, "clients": args.clients, "n": args.n, "minutes": round(wall / 60, 2),
            "requests_served": tally.served, "errors": tally.errors, "dropped_by_client": tally.dropped,
            "completion_tokens": tally.tokens, "tokens_per_s": round(tally.tokens / wall, 1),
            "blocks_leaked": int(idle.get("localchat:blocks_used", -1)),
            "requests_still_running": int(idle.get("localchat:num_requests_running", -1)),
            "blocks_total": int(idle.get("localchat:blocks_total", -1)),
            "rss_start_mib": round(rss_start / 2**20, 1) if rss_start else None,
            "rss_end_mib": round(rss_end / 2**20, 1) if rss_end else None,
            "error_samples": tally.error_samples,
            "server_exit_code": None,
        }
    finally:
        if proc is not None:
            proc.terminate()
            code = proc.wait(timeout=60)
    if proc is not None:
        report["server_exit_code"] = code
    print(json.dumps(report, indent=2))
    print(f"\nsoak: {report['clients']} clients x n={report['n']} for {report['minutes']} min on {model}: "
          f"{report['requests_served']} requests served, {report['errors']} errors, {report['dropped_by_client']} dropped "
          f"by the client, {report['blocks_leaked']} blocks leaked; RSS {report['rss_start_mib']} -> {report['rss_end_mib']} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 and report["blocks_leaked"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
