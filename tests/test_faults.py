"""Engine faults stay with the requests they hit: a step that raises, rows of NaN/inf logits, a
sampler that raises. Those requests end with a clear error and their blocks freed; every other
request finishes with the same output as in a run without faults; requests that could never fit are
refused when they arrive."""

from __future__ import annotations

import random

import pytest

from localchat.engine import EngineDriver, EngineProcess, RequestError, RequestFailed
from localchat.engine.sampling_params import SamplingParams

from helpers.faults import FaultInjector, blocks_used, faulty_tiny_engine
from test_engine import GREEDY, random_prompts, run_all


def _drain(engine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


@pytest.mark.parametrize("kind", ["raise_before", "raise_after", "nan_row", "inf_row"])
def test_a_fault_fails_only_the_requests_it_hit(tiny_engine, kind):
    prompts = random_prompts(6, seed=21, lo=5, hi=40)
    expected = run_all(tiny_engine(), prompts)
    engine = tiny_engine(max_num_seqs=3)  # three run at a time: the others wait and never see the fault
    injector = FaultInjector(engine, at={4: kind}, seed=1)
    ids = [engine.add_request(prompt_token_ids=p, params=GREEDY) for p in prompts]
    finals = _drain(engine)
    assert injector.faults == [kind] and injector.hit
    for rid, prompt, exp in zip(ids, prompts, expected):
        out = finals[rid]
        if rid in injector.hit:
            assert out.error is not None
            assert ("non-finite logits" if kind.endswith("_row") else "other requests were not affected") in out.error
            assert {o.finish_reason for o in out.outputs} == {"error"}
        else:
            assert out.error is None and out.outputs[0].token_ids == exp
    assert len(injector.hit) < len(prompts)
    if kind in ("nan_row", "inf_row"):
        assert len(injector.hit) == 1  # one row: one request, the rest of the step went on
    assert engine.block_manager.figures().blocks_used == 0
    engine.block_manager.check_invariants()
    # The engine still serves, and what the failed step left in the prefix cache is not reused wrongly.
    assert run_all(engine, prompts) == expected


def test_a_sampler_that_raises_fails_that_steps_requests(tiny_engine, monkeypatch):
    import localchat.engine.engine as engine_module

    prompts = random_prompts(3, seed=22, lo=5, hi=30)
    expected = run_all(tiny_engine(), prompts)
    engine = tiny_engine(max_num_seqs=1)
    real, calls = engine_module.sample, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected sampler bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "sample", flaky)
    ids = [engine.add_request(prompt_token_ids=p, params=GREEDY) for p in prompts]
    finals = _drain(engine)
    assert "injected sampler bug" in finals[ids[0]].error
    assert [finals[r].outputs[0].token_ids for r in ids[1:]] == expected[1:]
    assert engine.block_manager.figures().blocks_used == 0


def test_fault_injection_storm_other_requests_unchanged_and_no_block_leaks(tiny_engine):
    """The fork storm of tests/test_forks.py (random n, forks of live requests, aborts, a pool small
    enough to preempt) with faults at random steps: survivors equal a clean run, nothing leaks."""
    rng = random.Random(17)
    shared_heads = random_prompts(4, seed=23, lo=20, hi=60)
    engine = tiny_engine(block_size=4, num_blocks=64, max_num_batched_tokens=96, max_num_seqs=24)
    injector = FaultInjector(engine, rate=0.04, seed=5)
    submitted: dict[str, dict] = {}
    aborted: set[str] = set()
    finals: dict = {}
    for step in range(4000):
        if len(submitted) < 220 and rng.random() < 0.4:
            head = rng.choice(shared_heads)
            prompt = head + [rng.randrange(100, 40_000) for _ in range(rng.randrange(1, 30))]
            n, max_tokens = rng.choice([1, 1, 2, 3]), rng.randrange(1, 50)
            rid = engine.add_request(prompt_token_ids=prompt, params=GREEDY.with_(n=n, max_tokens=max_tokens))
            submitted[rid] = {"prompt": prompt, "n": n, "max_tokens": max_tokens}
        live = [r for r, q in engine.requests.items() if q.fork_from is None and q.beam is None and q.error is None]
        if live and rng.random() < 0.1:
            parent = rng.choice(live)
            seqs = [s for s in engine.requests[parent].seqs if not s.is_finished]
            if seqs:
                base = list(min(seqs, key=lambda s: s.index).token_ids)
                extra = [rng.randrange(100, 40_000) for _ in range(rng.randrange(0, 6))]
                max_tokens = rng.randrange(1, 12)
                rid = engine.add_request(fork_from=parent, prompt_token_ids=extra, params=GREEDY.with_(max_tokens=max_tokens))
                submitted[rid] = {"prompt": base + extra, "n": 1, "max_tokens": max_tokens}
        if engine.requests and rng.random() < 0.06:
            victim = rng.choice(list(engine.requests))
            engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if step % 50 == 0:
            engine.block_manager.check_invariants()
        if len(submitted) >= 220 and not engine.has_unfinished():
            break
    finals.update(_drain(engine))
    fig = engine.block_manager.figures()
    assert fig.blocks_used == 0
    engine.block_manager.check_invariants()
    assert len(submitted) >= 200 and len(aborted) >= 10
    assert fig.preemptions > 0 and fig.cow_copies > 0 and fig.prefix_hit_tokens > 0
    assert len(injector.faults) >= 10 and {"raise_before", "raise_after", "nan_row", "inf_row"} <= set(injector.faults)

    failed = {r for r, out in finals.items() if out.error is not None}
    assert failed and failed <= injector.hit  # only requests a fault touched fail
    survivors = [r for r in submitted if r not in aborted and r not in failed]
    assert len(survivors) >= 100
    clean = tiny_engine(block_size=16, num_blocks=4096)
    expected = clean.generate(
        prompt_token_ids=[submitted[r]["prompt"] for r in survivors],
        params=[GREEDY.with_(max_tokens=submitted[r]["max_tokens"]) for r in survivors],
    )
    for rid, exp in zip(survivors, expected):
        got = finals[rid]
        assert got.prompt_token_ids == submitted[rid]["prompt"]
        assert len(got.outputs) == submitted[rid]["n"]
        for o in got.outputs:
            assert o.token_ids == exp.outputs[0].token_ids, rid


def test_a_failed_request_raises_in_its_stream_and_the_others_finish(smol_tokenizer):
    prompts = random_prompts(3, seed=24, lo=5, hi=30)
    from helpers.tiny import tiny_engine

    expected = run_all(tiny_engine(smol_tokenizer), prompts)
    # The first forward pass serves only the first request (max_num_seqs=1): it alone fails.
    driver = EngineDriver(faulty_tiny_engine(tokenizer=smol_tokenizer, fault_at={0: "raise_before"}, max_num_seqs=1))
    try:
        streams = [driver.submit(prompt_token_ids=p, params=GREEDY) for p in prompts]
        with pytest.raises(RequestFailed, match="injected kernel error"):
            streams[0].result()
        assert [s.result().outputs[0].token_ids for s in streams[1:]] == expected[1:]
        assert driver.call(blocks_used) == 0
    finally:
        driver.shutdown()


def test_an_engine_process_contains_a_fault_the_same_way():
    prompts = random_prompts(2, seed=25, lo=5, hi=30)
    client = EngineProcess(faulty_tiny_engine, fault_at={0: "nan_row"}, max_num_seqs=1)
    try:
        first, second = (client.submit(prompt_token_ids=p, params=GREEDY) for p in prompts)
        with pytest.raises(RequestFailed, match="non-finite logits"):
            first.result()
        assert second.result().outputs[0].finish_reason == "length"
        assert client.call(blocks_used) == 0
        assert client.stopped is None
    finally:
        client.shutdown()


# ------------------------------------------------------------------ admission
@pytest.mark.parametrize(
    "prompt_len, params, message",
    [
        (20, SamplingParams(max_tokens=50), "use max_tokens 44 or less"),
        (70, SamplingParams(max_tokens=1), "KV cache holds only 64"),
        (20, SamplingParams(beam_width=4, max_tokens=20, ignore_eos=True), "use beam_width 2 or less"),
    ],
)
def test_requests_that_can_never_fit_are_refused_at_admission(tiny_engine, prompt_len, params, message):
    engine = tiny_engine(num_blocks=16, block_size=4)  # 64 tokens
    prompt = list(range(100, 100 + prompt_len))
    with pytest.raises(RequestError, match=message):
        engine.add_request(prompt_token_ids=prompt, params=params)
    assert not engine.has_unfinished() and engine.block_manager.figures().blocks_used == 0
    driver = EngineDriver(engine)
    try:
        with pytest.raises(RequestError, match=message):  # on the caller's thread, before the loop sees it
            driver.submit(prompt_token_ids=prompt, params=params)
    finally:
        driver.shutdown()


def test_the_largest_values_named_do_fit(tiny_engine):
    engine = tiny_engine(num_blocks=16, block_size=4)
    prompt = list(range(100, 120))
    finals = engine.generate(prompt_token_ids=[prompt, prompt],
                             params=[SamplingParams(max_tokens=44, ignore_eos=True, temperature=0),
                                     SamplingParams(beam_width=2, max_tokens=20, ignore_eos=True)])
    assert len(finals[0].outputs[0].token_ids) == 44
    assert all(len(o.token_ids) == 20 for o in finals[1].outputs)
    assert engine.block_manager.figures().blocks_used == 0


def test_a_fork_that_could_never_fit_is_refused(tiny_engine):
    engine = tiny_engine(num_blocks=16, block_size=4)
    parent = engine.add_request(prompt_token_ids=list(range(100, 130)), params=GREEDY.with_(max_tokens=20))
    engine.step()
    with pytest.raises(RequestError, match="KV cache"):
        engine.add_request(fork_from=parent, prompt_token_ids=[5] * 10, params=GREEDY.with_(max_tokens=40))
    _drain(engine)
    assert engine.block_manager.figures().blocks_used == 0


def test_a_reply_the_engine_fails_is_saved_as_failed_and_can_be_regenerated(smol_tokenizer, tmp_path):
    from localchat.chat.service import ChatService
    from localchat.chat.store import Store

    driver = EngineDriver(faulty_tiny_engine(tokenizer=smol_tokenizer, fault_at={4: "raise_after"}))
    store = Store(tmp_path / "chats.db")
    try:
        service = ChatService(driver, store)
        conversation, events = service.send_new("Tell me something.", GREEDY, title="faults")
        seen = []
        with pytest.raises(RequestFailed, match="out of memory for activations"):
            for update in events:
                seen.append(update[0].text)
        reply = store.current_path(conversation.id)[-1]
        assert reply.role == "assistant" and reply.finish_reason == "error"
        assert reply.content == seen[-1] and reply.token_ids  # what was shown is kept
        assert driver.call(blocks_used) == 0
        final = list(service.regenerate(reply.id, GREEDY))[-1][0]
        assert final.finish_reason == "length" and store.siblings(reply.id).count == 2
    finally:
        driver.shutdown()
        store.close()
