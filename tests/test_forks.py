"""Forks that share memory: n samples, forks of live requests, and a storm of them (tiny model)."""

from __future__ import annotations

import random

from localchat.engine.sampling_params import SamplingParams

from test_engine import GREEDY, random_prompts, run_all


def test_n_samples_fork_after_one_prefill_and_copy_only_the_last_block(tiny_engine):
    engine = tiny_engine(block_size=16)
    prompt = random_prompts(1, seed=11, lo=100, hi=101)[0]  # 100 tokens: 6 full blocks + 4 tokens
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
    out = engine.generate(prompt_token_ids=[prompt], params=params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 40 for o in out.outputs)
    mem = engine.memory()
    # One prefill only: the prompt was computed once, every sample forked from it.
    assert mem["prompt_tokens"] == 100
    assert mem["cow_copies"] == 3
    prompt_blocks, reply_blocks = 7, 3
    assert mem["blocks_used_peak"] <= prompt_blocks + 4 * reply_blocks + 4
    assert mem["blocks_unshared_at_used_peak"] >= 4 * (prompt_blocks + 2)
    assert mem["blocks_used"] == 0


def test_same_seed_same_samples_different_samples_differ(tiny_engine):
    prompt = random_prompts(1, seed=12)[0]
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=42, max_tokens=20, ignore_eos=True)
    first = [o.token_ids for o in tiny_engine().generate(prompt_token_ids=[prompt], params=params)[0].outputs]
    again = [o.token_ids for o in tiny_engine().generate(prompt_token_ids=[prompt], params=params)[0].outputs]
    assert first == again
    assert len({tuple(s) for s in first}) == 4
    single = tiny_engine().generate(prompt_token_ids=[prompt], params=params.with_(n=1))[0].outputs
    assert len(single) == 1 and single[0].token_ids == first[0]


def test_fork_from_a_live_request_shares_its_blocks(tiny_engine):
    engine = tiny_engine(block_size=8)
    prompt = random_prompts(1, seed=13, lo=50, hi=51)[0]
    parent_id = engine.add_request(prompt_token_ids=prompt, params=GREEDY.with_(max_tokens=30))
    for _ in range(6):
        engine.step()
    parent_tokens = list(engine.requests[parent_id].seqs[0].token_ids)
    extra = [1234, 5678]
    used_before = engine.block_manager.figures().blocks_used
    child_id = engine.add_request(fork_from=parent_id, prompt_token_ids=extra, params=GREEDY.with_(max_tokens=10))
    assert engine.block_manager.figures().blocks_used == used_before  # nothing allocated by the fork
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    fresh = tiny_engine(block_size=8)
    expected_child = run_all(fresh, [parent_tokens + extra], GREEDY.with_(max_tokens=10))[0]
    expected_parent = run_all(fresh, [prompt], GREEDY.with_(max_tokens=30))[0]
    assert finals[child_id].outputs[0].token_ids == expected_child
    assert finals[child_id].prompt_token_ids == parent_tokens + extra
    assert finals[parent_id].outputs[0].token_ids == expected_parent
    assert engine.block_manager.figures().blocks_used == 0


def test_fork_of_unknown_request_is_a_clear_error(tiny_engine):
    import pytest

    from localchat.engine import RequestError

    engine = tiny_engine()
    with pytest.raises(RequestError, match="not running"):
        engine.add_request(fork_from="nope", params=GREEDY)
    assert not engine.has_unfinished()


def test_storm_of_forks_aborts_and_finishes(tiny_engine):
    """Hundreds of sequences: random n, forks of live requests, aborts, a pool small enough to
    preempt. Survivors' outputs must equal a clean run of the same prompts, and no block leaks."""
    rng = random.Random(7)
    shared_heads = random_prompts(4, seed=14, lo=20, hi=60)
    engine = tiny_engine(block_size=4, num_blocks=64, max_num_batched_tokens=96, max_num_seqs=24)
    submitted: dict[str, dict] = {}
    aborted: set[str] = set()
    finals: dict = {}
    for step in range(2500):
        if len(submitted) < 240 and rng.random() < 0.4:
            head = rng.choice(shared_heads)
            prompt = head + [rng.randrange(100, 40_000) for _ in range(rng.randrange(1, 30))]
            n = rng.choice([1, 1, 2, 3])
            max_tokens = rng.randrange(1, 60)
            rid = engine.add_request(prompt_token_ids=prompt, params=GREEDY.with_(n=n, max_tokens=max_tokens))
            submitted[rid] = {"prompt": prompt, "n": n, "max_tokens": max_tokens}
        live = [r for r in engine.requests if engine.requests[r].fork_from is None and engine.requests[r].beam is None]
        if live and rng.random() < 0.1:
            parent = rng.choice(live)
            seqs = [s for s in engine.requests[parent].seqs if not s.is_finished]
            if seqs:
                base = list(min(seqs, key=lambda s: s.index).token_ids)
                extra = [rng.randrange(100, 40_000) for _ in range(rng.randrange(0, 6))]
                max_tokens = rng.randrange(1, 12)
                rid = engine.add_request(fork_from=parent, prompt_token_ids=extra, params=GREEDY.with_(max_tokens=max_tokens))
                submitted[rid] = {"prompt": base + extra, "n": 1, "max_tokens": max_tokens}
        if engine.requests and rng.random() < 0.08:
            victim = rng.choice(list(engine.requests))
            engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        engine.block_manager.check_invariants() if step % 50 == 0 else None
        if len(submitted) >= 240 and not engine.has_unfinished():
            break
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    fig = engine.block_manager.figures()
    assert fig.blocks_used == 0
    engine.block_manager.check_invariants()
    assert len(submitted) >= 200 and len(aborted) >= 10
    assert fig.preemptions > 0 and fig.cow_copies > 0 and fig.prefix_hit_tokens > 0

    survivors = [r for r in submitted if r not in aborted]
    clean = tiny_engine(block_size=16, num_blocks=4096)
    expected = clean.generate(
        prompt_token_ids=[submitted[r]["prompt"] for r in survivors],
        params=[GREEDY.with_(max_tokens=submitted[r]["max_tokens"]) for r in survivors],
    )
    for rid, exp in zip(survivors, expected):
        got = finals[rid]
        assert got.prompt_token_ids == submitted[rid]["prompt"]
        assert len(got.outputs) == submitted[rid]["n"]
        for o in got.outputs:  # greedy: every sample equals the single clean output
            assert o.token_ids == exp.outputs[0].token_ids, rid
