"""The paged KV memory manager: operations, invariants, sharing, prefix cache, snapshots."""

import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from localchat.engine.block_manager import BlockManager, BlockManagerError, OutOfBlocks


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def run_sequence(bm: BlockManager, seq_id: int, prompt: list[int]) -> int:
    """Allocate a prompt and compute it fully, as the engine would."""
    hit = bm.allocate(seq_id, prompt)
    copies = bm.append(seq_id, prompt[hit:])
    assert copies == [] or hit % bm.block_size  # only a borrowed block is copied
    bm.mark_computed(seq_id)
    return hit


# ------------------------------------------------------------------ construction
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_block_size(bad):
    with pytest.raises(BlockManagerError, match="block_size"):
        BlockManager(8, block_size=bad)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_num_blocks(bad):
    with pytest.raises(BlockManagerError, match="num_blocks"):
        BlockManager(bad, block_size=4)


def test_unknown_or_freed_sequence_errors():
    bm = BlockManager(8, block_size=4)
    with pytest.raises(BlockManagerError, match="unknown or freed"):
        bm.append(1, [1])
    with pytest.raises(BlockManagerError, match="unknown or freed"):
        bm.free(1)
    bm.allocate(1, [1, 2])
    bm.append(1, [1, 2])
    bm.free(1)
    with pytest.raises(BlockManagerError, match="unknown or freed"):
        bm.free(1)
    with pytest.raises(BlockManagerError, match="unknown or freed"):
        bm.append(1, [3])
    with pytest.raises(BlockManagerError, match="unknown or freed"):
        bm.fork(1, 2)
    with pytest.raises(BlockManagerError, match="empty prompt"):
        bm.allocate(3, [])
    bm.allocate(4, [1])
    with pytest.raises(BlockManagerError, match="already has"):
        bm.allocate(4, [1])
    with pytest.raises(BlockManagerError, match="outside"):
        bm.slots(4, -1, 1)
    with pytest.raises(BlockManagerError, match="outside"):
        bm.mark_computed(4, 5)
    bm.check_invariants()


# -------------------------------------------------------------------- operations
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_allocate_append_lazily(block_size):
    bm = BlockManager(64, block_size=block_size, enable_prefix_cache=False)
    prompt = toks(100, 10)
    assert bm.allocate(1, prompt) == 0
    assert bm.figures().blocks_used == 0  # nothing reserved before tokens arrive
    bm.append(1, prompt)
    n_blocks = -(-10 // block_size)
    assert len(bm.block_table(1)) == n_blocks
    assert bm.figures().blocks_used == n_blocks
    for i in range(7):
        before = len(bm.block_table(1))
        bm.append(1, [500 + i])
        grew = len(bm.block_table(1)) - before
        assert grew == (1 if (10 + i) % block_size == 0 else 0)
    assert bm.read_tokens(1) == prompt + toks(500, 7)
    slots = bm.slots(1, 0, 17)
    assert len(set(slots)) == 17
    table = bm.block_table(1)
    assert slots[5] == table[5 // block_size] * block_size + 5 % block_size
    bm.check_invariants()
    bm.free(1)
    assert bm.figures().blocks_used == 0
    bm.check_invariants()


def test_fork_shares_and_cow_copies_only_last_partial_block():
    bm = BlockManager(32, block_size=4)
    run_sequence(bm, 1, toks(0, 10))  # blocks: 4 + 4 + 2
    bm.fork(1, 2)
    assert bm.block_table(1) == bm.block_table(2)
    f = bm.figures()
    assert f.blocks_used == 3 and f.blocks_unshared == 6
    assert all(bm.pool.ref_counts[b] == 2 for b in bm.block_table(1))
    copies = bm.append(2, [99])
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == bm.block_table(1)[-1] and dst == bm.block_table(2)[-1]
    assert bm.block_table(1)[:2] == bm.block_table(2)[:2]
    assert bm.pool.ref_counts[src] == 1
    assert bm.figures().cow_copies == 1
    # The parent is now the only owner of the old block: appending needs no copy.
    assert bm.append(1, [77]) == []
    assert bm.read_tokens(1) == toks(0, 10) + [77]
    assert bm.read_tokens(2) == toks(0, 10) + [99]
    bm.check_invariants()


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(16, block_size=4)
    run_sequence(bm, 1, toks(0, 8))
    bm.fork(1, 2)
    assert bm.append(2, [5]) == []
    assert bm.append(1, [6]) == []
    assert bm.block_table(1)[:2] == bm.block_table(2)[:2]
    bm.check_invariants()


def test_prefix_cache_reuses_live_and_cached_blocks_but_never_the_last_token():
    bm = BlockManager(32, block_size=4)
    prompt = toks(0, 12)
    assert run_sequence(bm, 1, prompt) == 0
    # Same prompt while 1 is live: two blocks shared, the third borrowed for 3 of its 4 tokens, so
    # only the last token is computed, into a copy of the borrowed block.
    assert bm.allocate(2, prompt) == 11
    assert bm.block_table(2) == bm.block_table(1)
    third = bm.block_table(1)[2]
    copies = bm.append(2, prompt[11:])
    assert copies == [(third, bm.block_table(2)[2])] and bm.block_table(2)[2] != third
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.read_tokens(1) == prompt and bm.read_tokens(2) == prompt
    bm.mark_computed(2)
    bm.check_invariants()
    bm.free(1)
    bm.free(2)
    f = bm.figures()
    assert f.blocks_used == 0 and f.blocks_cached >= 3
    # Cached after free: a longer prompt sharing the head hits all three full blocks.
    assert bm.allocate(3, prompt + [50, 51]) == 12
    assert bm.figures().prefix_hit_tokens == 11 + 12
    bm.check_invariants()


def test_borrowed_block_is_copied_with_only_the_tokens_the_prompt_shares():
    """A regenerate asks for a prompt that ends inside the block its first reply filled; an edit
    diverges inside a block. Either borrows the leading tokens it shares and never writes the
    cached block itself."""
    bm = BlockManager(16, block_size=4, watermark=0.0)
    first = toks(0, 6) + [90, 91]  # the prompt (6 tokens) and the first reply's two tokens
    run_sequence(bm, 1, first)
    bm.free(1)
    cached = dict(bm.block_token_ids(range(16)))
    for seq, prompt, hit in ((2, toks(0, 6), 5), (3, toks(0, 5) + [77, 78], 5), (4, [0, 1, 2, 99, 4], 3), (5, [7, 1], 0)):
        assert bm.can_allocate(prompt)
        assert bm.allocate(seq, prompt) == hit
        copies = bm.append(seq, prompt[hit:])
        assert bool(copies) == bool(hit % 4)
        bm.mark_computed(seq)
        assert bm.read_tokens(seq) == prompt
        bm.check_invariants()
        bm.free(seq)
    # the first reply's blocks still hold what they held, and are still found
    assert {b: t for b, t in bm.block_token_ids(range(16)).items() if b in cached and cached[b]} == \
        {b: t for b, t in cached.items() if t}
    assert bm.allocate(6, first + [5]) == 8


def test_a_borrow_needs_a_block_for_its_copy():
    """Where the pool has no block for the copy, the borrow is given up, not the admission."""
    prompt = toks(0, 6)  # block 0 whole, then block 1 for 1 token
    for num_blocks, hit in ((3, 5), (2, 4)):
        bm = BlockManager(num_blocks, block_size=4, watermark=0.0)
        run_sequence(bm, 1, toks(0, 8))
        bm.free(1)
        assert bm.can_allocate(prompt)
        assert bm.allocate(2, prompt) == hit
        bm.append(2, prompt[hit:])
        assert bm.read_tokens(2) == prompt
        bm.check_invariants()


def test_prefix_cache_disabled():
    bm = BlockManager(32, block_size=4, enable_prefix_cache=False)
    run_sequence(bm, 1, toks(0, 12))
    bm.free(1)
    assert bm.allocate(2, toks(0, 12)) == 0
    assert bm.figures().blocks_cached == 0


def test_lru_eviction_only_when_needed_and_oldest_first():
    bm = BlockManager(6, block_size=2)
    run_sequence(bm, 1, [1, 2, 3, 4, 5])  # 3 blocks, 2 full
    bm.free(1)
    run_sequence(bm, 2, [7, 8, 9, 10, 11])
    bm.free(2)
    f = bm.figures()
    assert f.blocks_cached == 4 and f.blocks_free == 2
    # Needs 4 blocks: 2 free ones first, then the 2 oldest cached (sequence 1's, tail first).
    run_sequence(bm, 3, toks(20, 8))
    assert bm.figures().evictions == 2
    bm.free(3)
    assert bm.allocate(4, [7, 8, 9, 10, 11]) == 4  # sequence 2's blocks survived
    assert bm.allocate(5, [1, 2, 3, 4, 5]) == 0
    bm.check_invariants()


def test_out_of_blocks_is_an_answer_not_a_corrupt_state():
    bm = BlockManager(3, block_size=2, watermark=0.0)
    bm.allocate(1, toks(0, 4))
    bm.append(1, toks(0, 4))
    assert not bm.can_allocate(toks(10, 6))
    assert bm.can_allocate(toks(10, 2))
    bm.allocate(2, toks(10, 2))
    bm.append(2, toks(10, 2))
    assert not bm.can_append(1, 1)
    with pytest.raises(OutOfBlocks):
        bm.append(1, [9])
    assert bm.read_tokens(1) == toks(0, 4)
    bm.check_invariants()
    bm.free(2)
    assert bm.can_append(1, 1)
    bm.append(1, [9])
    bm.check_invariants()


def test_watermark_holds_back_admission():
    bm = BlockManager(100, block_size=1, watermark=0.1)
    assert bm.can_allocate(toks(0, 90))
    assert not bm.can_allocate(toks(0, 91))


def test_cow_needs_a_block_in_admission():
    bm = BlockManager(4, block_size=4, watermark=0.0)
    run_sequence(bm, 1, toks(0, 6))
    bm.fork(1, 2)
    assert bm.blocks_needed_to_append(2, 1) == 1
    assert bm.blocks_needed_to_append(2, 3) == 2


def test_four_forks_of_a_long_prompt_share_it():
    bs = 16
    bm = BlockManager(1024, block_size=bs)
    prompt = toks(0, 1000)
    run_sequence(bm, 0, prompt)
    for child in range(1, 5):
        bm.fork(0, child)
    bm.free(0)
    for step in range(128):
        for child in range(1, 5):
            bm.append(child, [10_000 * child + step])
            bm.mark_computed(child)
    prompt_blocks = -(-1000 // bs)
    reply_blocks = -(-128 // bs)
    f = bm.figures()
    assert bm.peaks()["blocks_used_peak"] <= prompt_blocks + 4 * reply_blocks + 4
    assert f.sharing_savings >= 0.6, f
    assert f.cow_copies == 3  # three children copy the shared partial block; the last owns it
    for child in range(1, 5):
        assert bm.read_tokens(child) == prompt + [10_000 * child + s for s in range(128)]
    bm.check_invariants()
    for child in range(1, 5):
        bm.free(child)
    assert bm.figures().blocks_used == 0


def test_hash_collision_never_shares_blocks():
    bm = BlockManager(64, block_size=4, hash_fn=lambda parent, tokens: 42)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    b = [9, 9, 9, 9, 5, 6, 7, 8, 9]  # second block equal, first block different
    c = [1, 2, 3, 4, 0, 0, 0, 0, 9]  # first block equal, second block different
    run_sequence(bm, 1, a)
    assert bm.allocate(2, b) == 0
    bm.append(2, b)
    bm.mark_computed(2)
    assert set(bm.block_table(1)).isdisjoint(bm.block_table(2))
    assert bm.allocate(3, c) == 4
    assert bm.block_table(3) == bm.block_table(1)[:1]
    bm.append(3, c[4:])
    bm.mark_computed(3)
    assert bm.allocate(4, a) == 8  # the true match is still found among colliding entries
    assert bm.block_table(4) == bm.block_table(1)[:2]
    bm.append(4, a[8:])
    for s in (1, 2, 3, 4):
        bm.free(s)
    assert bm.allocate(5, b + [1]) == 8
    bm.append(5, [1, 1])
    assert bm.read_tokens(5) == b[:8] + [1, 1]
    bm.check_invariants()


def test_identical_prompts_computed_side_by_side_still_chain():
    bm = BlockManager(64, block_size=2)
    p = toks(0, 7)
    bm.allocate(1, p)
    bm.allocate(2, p)
    bm.append(1, p)
    bm.append(2, p)
    bm.mark_computed(1)
    bm.mark_computed(2)
    bm.free(1)
    assert bm.allocate(3, p) == 6
    bm.check_invariants()


def test_snapshot_reports_states_owners_and_figures():
    bm = BlockManager(10, block_size=4)
    run_sequence(bm, 1, toks(0, 9))
    bm.fork(1, 2)
    bm.append(2, [1])
    snap = bm.snapshot()
    assert snap.tables[1][:2] == snap.tables[2][:2]
    shared = snap.blocks[snap.tables[1][0]]
    assert shared.state == "used" and shared.ref_count == 2 and set(shared.owners) == {1, 2}
    assert shared.num_tokens == 4
    f = snap.figures
    assert f.blocks_total == 10 and f.blocks_used == 4
    assert f.blocks_used + f.blocks_cached + f.blocks_free == 10
    assert f.kv_utilization == pytest.approx((4 + 4 + 1 + 2) / (4 * 4))
    assert f.sharing_savings == pytest.approx(1 - 4 / 6)
    assert snap.peaks["blocks_used_peak"] == 4
    bm.free(1)
    bm.free(2)
    states = {b.state for b in bm.snapshot().blocks}
    assert states == {"cached", "free"}


def test_snapshot_from_another_thread_while_mutating():
    bm = BlockManager(256, block_size=4)
    stop = threading.Event()
    errors: list[BaseException] = []
    taken = 0

    def reader():
        nonlocal taken
        while not stop.is_set():
            try:
                snap = bm.snapshot()
                f = snap.figures
                assert f.blocks_used + f.blocks_cached + f.blocks_free == f.blocks_total
                assert sum(b.state == "used" for b in snap.blocks) == f.blocks_used
                taken += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    start = time.perf_counter()
    for i in range(300):
        run_sequence(bm, i, toks(i % 7, 30))
        if i % 3 == 0:
            bm.fork(i, 10_000 + i)
            bm.append(10_000 + i, [i])
            bm.free(10_000 + i)
        if i >= 5:
            bm.free(i - 5)
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    assert not errors, errors
    assert taken > 0
    assert elapsed < 10


# ------------------------------------------------- property-based state machine
class ReferenceModel:
    """What each live sequence must read back, independent of block sharing."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(4, 40),
        block_size=st.integers(1, 5),
        prefix_cache=st.booleans(),
        colliding=st.booleans(),
    )
    def setup(self, num_blocks, block_size, prefix_cache, colliding):
        hash_fn = (lambda p, t: hash(t) % 3) if colliding else None
        kwargs = {"hash_fn": hash_fn} if hash_fn else {}
        self.bm = BlockManager(num_blocks, block_size, watermark=0.0, enable_prefix_cache=prefix_cache, **kwargs)
        self.ref = ReferenceModel()
        self.next_id = 0

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=20))
    def allocate(self, prompt):
        sid = self._new_id()
        if not self.bm.can_allocate(prompt):
            return
        hit = self.bm.allocate(sid, prompt)
        assert hit < len(prompt)  # the last token is always computed
        assert self.bm.read_tokens(sid) == prompt[:hit]
        try:
            self.bm.append(sid, prompt[hit:])
        except OutOfBlocks:
            # can_allocate is computed before the hit blocks are taken; a tiny pool can
            # still fall short. Give up on this sequence as the scheduler would.
            self.bm.free(sid)
            return
        self.bm.mark_computed(sid)
        self.ref.tokens[sid] = list(prompt)

    @precondition(lambda self: self.ref.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, data, new):
        sid = data.draw(st.sampled_from(sorted(self.ref.tokens)))
        if not self.bm.can_append(sid, len(new)):
            with pytest.raises(OutOfBlocks):
                self.bm.append(sid, new)
            return
        before = {s: self.bm.block_table(s) for s in self.ref.tokens if s != sid}
        copies = self.bm.append(sid, new)
        for src, dst in copies:
            assert src != dst
            assert dst in self.bm.block_table(sid)
        # Another sequence's table never changes because of this append.
        assert before == {s: self.bm.block_table(s) for s in self.ref.tokens if s != sid}
        if data.draw(st.booleans()):
            self.bm.mark_computed(sid)
        self.ref.tokens[sid].extend(new)

    @precondition(lambda self: self.ref.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.ref.tokens)))
        child = self._new_id()
        self.bm.fork(parent, child)
        self.ref.tokens[child] = list(self.ref.tokens[parent])

    @precondition(lambda self: self.ref.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.ref.tokens)))
        self.bm.mark_computed(sid)
        self.bm.free(sid)
        del self.ref.tokens[sid]

    @rule()
    def reset_cache(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def invariants_hold(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants()
        for sid, expected in self.ref.tokens.items():
            assert self.bm.read_tokens(sid) == expected
            assert self.bm.num_tokens(sid) == len(expected)
        if not self.ref.tokens:
            assert self.bm.figures().blocks_used == 0

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for sid in list(self.ref.tokens):
            self.bm.free(sid)
        assert self.bm.figures().blocks_used == 0
        self.bm.check_invariants()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerProperties = BlockManagerMachine.TestCase
