"""16 concurrent streaming clients on one server (tiny engine in its own process): mixed n, a quarter
of them hanging up early. Every request is answered in full or cleanly aborted, the batch really
ran them together, and afterwards no block is in use and the block manager's invariants hold."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from helpers.api_server import ServerThread
from helpers.tiny import tiny_engine
from localchat.api.server import create_app
from localchat.engine import EngineProcess

openai = pytest.importorskip("openai")

CLIENTS = 16
MAX_TOKENS = 60
HANG_UP_AFTER = 5  # chunks a disconnecting client reads


def check_invariants(engine) -> None:
    engine.block_manager.check_invariants()


def reset_peaks(engine) -> None:
    engine.block_manager.reset_peaks()


def peaks(engine) -> dict:
    return engine.block_manager.peaks()


async def one_client(oa, i: int) -> dict:
    n = 1 + i % 3
    leaves = i % 4 == 3  # a quarter of the clients
    messages = [{"role": "system", "content": "You answer questions about birds."},
                {"role": "user", "content": f"Question {i}: tell me about bird number {i}."}]
    stream = await oa.chat.completions.create(
        model="tiny", messages=messages, n=n, temperature=1.0, seed=i, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks, reasons, texts, usage = 0, {}, {}, None
    async for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
        if leaves and chunks >= HANG_UP_AFTER:
            await stream.close()
            break
    return {"n": n, "left": leaves, "reasons": reasons, "texts": texts, "usage": usage}


async def run_clients(url: str) -> list[dict]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as oa:
        return await asyncio.gather(*(one_client(oa, i) for i in range(CLIENTS)))


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def engine_client():
    client = EngineProcess(tiny_engine, seed=5, num_blocks=1024, block_size=8)
    yield client
    client.shutdown()


def test_sixteen_concurrent_streams_with_mixed_n_and_hang_ups(engine_client):
    engine_client.call(reset_peaks)
    app = create_app(engine_client)
    try:
        with ServerThread(app) as srv:
            results = asyncio.run(run_clients(srv.url))
            stayed = [r for r in results if not r["left"]]
            left = [r for r in results if r["left"]]
            assert len(left) == CLIENTS // 4
            for r in stayed:  # answered in full: every choice, every token, the usage
                assert sorted(r["reasons"]) == list(range(r["n"])) and set(r["reasons"].values()) == {"length"}
                assert r["usage"].completion_tokens == r["n"] * MAX_TOKENS and all(r["texts"].values())
            for r in left:
                assert not r["reasons"] and r["usage"] is None
            # Cleanly aborted: the server noticed each hang-up, and nothing holds a block afterwards.
            deadline_checks = 0
            while metric(srv.url, "localchat:num_requests_running") or metric(srv.url, "localchat:blocks_used"):
                deadline_checks += 1
                assert deadline_checks < 600, "requests still running long after every client finished"
                asyncio.run(asyncio.sleep(0.05))
            assert metric(srv.url, 'localchat:request_success_total{finished_reason="abort"}') == len(left)
            assert metric(srv.url, 'localchat:request_success_total{finished_reason="length"}') == len(stayed)
            assert metric(srv.url, "localchat:num_requests_waiting") == 0
            assert metric(srv.url, "localchat:time_to_first_token_seconds_count") == CLIENTS
    finally:
        app.state.api.close()
    engine_client.call(check_invariants)
    # They ran together: at the peak, more blocks were live than any one request ever holds (n=3:
    # ~4 prompt blocks shared + 3 x 8 reply blocks).
    assert engine_client.call(peaks)["blocks_used_peak"] > 40
