"""What the memory panel and the overview ask the engine: the pool as arrays, the timeline of blocks
with forks, copy-on-write copies and preemptions, owners of live sequences, block contents, and how
much of a token list the prefix cache holds (localchat/engine/block_manager.py, timeline.py, panel.py)."""

from __future__ import annotations

import pickle

import pytest

from localchat.engine import EngineDriver, EngineProcess, SamplingParams
from localchat.engine.block_manager import CACHED, FREE, USED, BlockManager
from localchat.engine.panel import block_tokens, cached_prefix_tokens, panel_snapshot
from localchat.engine.timeline import Timeline


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def forked(bm: BlockManager) -> None:
    bm.allocate(1, list(range(10)))
    bm.append(1, list(range(10)))  # blocks of 4, 4, 2
    bm.mark_computed(1)
    bm.fork(1, 2)
    bm.append(2, [99])  # copy-on-write of the shared partial block


def test_compact_snapshot_matches_the_per_block_snapshot():
    bm = BlockManager(num_blocks=16, block_size=4)
    forked(bm)
    bm.allocate(3, list(range(9)))
    bm.append(3, list(range(9)))
    bm.mark_computed(3)
    bm.free(3)  # its two full blocks are cached, its partial one free
    full, compact = bm.snapshot(), bm.compact_snapshot()
    names = {FREE: "free", CACHED: "cached", USED: "used"}
    assert [names[s] for s in compact.states] == [b.state for b in full.blocks]
    assert compact.tables == full.tables and compact.seq_tokens == full.seq_tokens
    assert compact.figures == full.figures
    assert compact.states.count(CACHED) == full.figures.blocks_cached == 2
    # a used block's ref count is the number of tables holding it (invariant 2)
    refs = {}
    for table in compact.tables.values():
        for b in table:
            refs[b] = refs.get(b, 0) + 1
    assert {b: r for b, r in refs.items() if r > 1} == {b.block_id: b.ref_count for b in full.blocks if b.ref_count > 1}
    assert len(pickle.dumps(compact)) < 4096  # small enough to cross a pipe every second


def test_compact_snapshot_of_a_large_pool_is_small():
    bm = BlockManager(num_blocks=40_000, block_size=16)
    for seq in range(8):
        bm.allocate(seq, list(range(seq, seq + 1000)))
        bm.append(seq, list(range(seq, seq + 1000)))
    compact = bm.compact_snapshot()
    assert len(compact.states) == 40_000
    assert len(pickle.dumps(compact)) < 120_000  # bytes per block, not an object per block


def test_timeline_records_forks_copies_and_preemptions():
    bm = BlockManager(num_blocks=16, block_size=4)
    clock = Clock()
    bm.timeline = Timeline(interval_s=0.25, clock=clock)
    bm.allocate(1, list(range(6)))
    bm.append(1, list(range(6)))
    bm.mark_computed(1)
    clock.t += 1
    bm.fork(1, 2)
    bm.append(2, [7])
    clock.t += 1
    bm.record_preemption()
    view = bm.compact_snapshot().timeline
    kinds = [kind for _, kind, _ in view.events]
    assert kinds == ["fork", "cow", "preempt"]
    assert view.events[0][2] == 2 and view.events[1][2] == 2  # the child forked and copied
    used = [s[1] for s in view.samples]
    assert used[0] == 0 and used[-1] == 3  # nothing at first; then two shared blocks plus the copy
    assert view.samples[-1][3] == 1  # one full block shared by both tables
    later = bm.compact_snapshot(since=view.now).timeline
    assert later.events == () and all(s[0] > view.now for s in later.samples)


def test_timeline_rate_limits_samples_and_keeps_flat_lines_short():
    clock = Clock()
    t = Timeline(interval_s=0.25, max_samples=5, clock=clock)
    t.sample(1, 0, 0)
    assert not t.due()
    clock.t += 0.3
    assert t.due()
    t.sample(1, 0, 0)  # unchanged: no new point
    assert len(t.samples) == 1
    for i in range(10):
        clock.t += 1
        t.sample(i, 0, 0)
    assert len(t.samples) == 5  # a ring buffer


def test_cached_prefix_tokens_counts_whole_cached_blocks_without_touching_them():
    bm = BlockManager(num_blocks=16, block_size=4)
    ids = list(range(11))
    bm.allocate(1, ids)
    bm.append(1, ids)
    bm.mark_computed(1)
    bm.free(1)  # blocks [0-3] and [4-7] cached; [8-10] was partial
    lru = bm.pool.cached_blocks_lru()
    assert bm.cached_prefix_tokens(ids) == 8
    assert bm.cached_prefix_tokens(ids[:8]) == 8 and bm.cached_prefix_tokens(ids[:7]) == 4
    assert bm.cached_prefix_tokens([0, 1, 2, 99] + ids[4:]) == 0
    assert bm.cached_prefix_tokens([]) == 0
    assert bm.pool.cached_blocks_lru() == lru  # asking never reorders the LRU
    assert bm.block_token_ids(lru) == {lru[0]: [4, 5, 6, 7], lru[1]: [0, 1, 2, 3]} or \
        bm.block_token_ids(lru) == {lru[0]: [0, 1, 2, 3], lru[1]: [4, 5, 6, 7]}
    bm.check_invariants()
    off = BlockManager(num_blocks=8, block_size=4, enable_prefix_cache=False)
    assert off.cached_prefix_tokens(ids) == 0


def _engine_queries(driver, tokenizer):
    prompt = tokenizer.encode("Tell me about blocks and tables and caches", add_special_tokens=False) * 3
    stream = driver.submit(prompt_token_ids=prompt, params=SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=60, ignore_eos=True))
    seen = None
    for out in stream:
        if not out.finished and len(out.outputs) == 3:
            seen = driver.call(panel_snapshot)
            break
    stream.result()
    assert seen is not None
    live = [s for s in seen.sequences if s.request_id == stream.request_id]
    assert sorted(s.index for s in live) == [0, 1, 2] and all(not s.beam for s in live)
    tables = [seen.memory.tables[s.seq_id] for s in live]
    shared = set(tables[0]) & set(tables[1]) & set(tables[2])
    assert len(shared) >= len(prompt) // 16 - 1  # the history is stored once for three samples
    assert seen.block_bytes > 0 and seen.memory.figures.num_sequences == 3
    after = driver.call(panel_snapshot)
    assert after.sequences == () and after.memory.states.count(CACHED) > 0
    cached = driver.call(cached_prefix_tokens, [prompt, [5] * 40])
    assert cached[0] >= (len(prompt) // 16 - 1) * 16 and cached[1] == 0
    some = sorted(shared)[:2]
    got = driver.call(block_tokens, some)
    assert [t for b in some for t in got[b]] == prompt[: 16 * len(some)] or all(len(got[b]) == 16 for b in some)


def test_panel_queries_through_the_driver(tiny_engine, smol_tokenizer):
    driver = EngineDriver(tiny_engine(num_blocks=128, block_size=16))
    try:
        _engine_queries(driver, smol_tokenizer)
    finally:
        driver.shutdown()


@pytest.mark.timeout(300)
def test_panel_queries_cross_the_process_boundary(smol_tokenizer):
    from helpers.tiny import tiny_engine

    driver = EngineProcess(tiny_engine, num_blocks=128, block_size=16)
    try:
        _engine_queries(driver, smol_tokenizer)
    finally:
        driver.shutdown()
