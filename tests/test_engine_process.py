"""The engine in a process of its own (localchat/engine/process.py): same answers as in-process, clean ends."""

from __future__ import annotations

import os
import signal

import pytest

from helpers.tiny import failing_factory, tiny_engine
from localchat.engine import EngineDriver, EngineProcess, EngineStopped, RequestError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def blocks_used(engine) -> int:
    return engine.block_manager.figures().blocks_used


def failing_call(engine):
    raise ValueError("no such thing")


@pytest.fixture(scope="module")
def process():
    client = EngineProcess(tiny_engine, seed=3, num_blocks=256, block_size=8)
    yield client
    client.shutdown()


def test_same_ids_as_the_engine_in_this_process(process, smol_tokenizer):
    local = EngineDriver(tiny_engine(smol_tokenizer, seed=3, num_blocks=256, block_size=8))
    try:
        prompts = ["Hello there", "Tell me about owls", "What is 2+2?"]
        streams = [process.submit(p, params=GREEDY) for p in prompts]  # batched together in the child
        remote = [s.result().outputs[0].token_ids for s in streams]
        mine = [local.submit(p, params=GREEDY).result().outputs[0].token_ids for p in prompts]
        assert remote == mine and all(len(ids) == 12 for ids in remote)
    finally:
        local.shutdown()
    assert process.info.model_name == "tiny" and process.info.num_blocks == 256
    assert process.call(blocks_used) == 0


def test_n_samples_share_blocks_and_stream_deltas(process):
    stream = process.submit("Name a color", params=SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=8, ignore_eos=True))
    updates = list(stream)
    final = updates[-1]
    assert final.finished and len(final.outputs) == 3
    for o in final.outputs:
        assert "".join(u.outputs[o.index].delta_text for u in updates if len(u.outputs) > o.index) == o.text
    assert process.call(blocks_used) == 0


def test_abort_frees_blocks_and_snapshot_shows_them(process):
    stream = process.submit("Go on", params=SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True))
    first = next(iter(stream))
    assert not first.finished
    snap = process.snapshot()
    assert snap.figures.blocks_used >= 1 and len(snap.tables) == 1
    stream.abort()
    final = stream.result()
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert process.call(blocks_used) == 0


def test_errors_come_back_where_they_belong(process):
    with pytest.raises(RequestError, match="empty"):
        process.submit("   ", params=GREEDY)  # refused in this process, before the child sees it
    with pytest.raises(RequestError, match="context holds"):
        process.submit(prompt_token_ids=[5] * 600, params=GREEDY)
    with pytest.raises(ValueError, match="no such thing"):
        process.call(failing_call)
    assert process.submit("Still serving", params=GREEDY).result().outputs[0].token_ids


def test_a_factory_that_fails_is_a_clear_error():
    with pytest.raises(ValueError, match="could not start: ValueError: bad model name"):
        EngineProcess(failing_factory, "bad model name")


def test_a_dead_engine_process_ends_every_stream():
    client = EngineProcess(tiny_engine, seed=1, num_blocks=128, block_size=8)
    try:
        stream = client.submit("Go on", params=SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True))
        next(iter(stream))
        os.kill(client._process.pid, signal.SIGKILL)
        with pytest.raises(EngineStopped, match="stopped unexpectedly"):
            stream.result()
        with pytest.raises(EngineStopped):
            client.submit("Hello", params=GREEDY).result()
    finally:
        client.shutdown()


def test_shutdown_ends_running_requests():
    client = EngineProcess(tiny_engine, seed=1, num_blocks=128, block_size=8)
    stream = client.submit("Go on", params=SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True))
    next(iter(stream))
    client.shutdown()
    with pytest.raises(EngineStopped, match="shut down"):
        stream.result()
    with pytest.raises(EngineStopped):
        client.submit("Hello", params=GREEDY)
