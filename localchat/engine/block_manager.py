"""Block tables over the block pool: allocate, append, fork, copy-on-write, free, prefix cache.

The engine drives it like this for every sequence:
1. `allocate(seq_id, prompt_ids)` creates the table and takes every full prompt block found in
   the prefix cache, then borrows the cached block after them that shares the most leading tokens
   with the rest of the prompt (a regenerate's prompt ends inside the block its first reply filled;
   an edit diverges inside a block). It never counts the last prompt token, so there is always one
   token to compute, and returns how many prompt tokens are already computed.
2. Before each forward pass, `append(seq_id, new_ids)` reserves slots for the tokens the pass will
   compute, allocating a block only on a block boundary. If the last block is shared with another
   table or registered in the prefix cache (a borrowed block), it is replaced by a private copy of
   the tokens this table holds first; the returned (src, dst) pairs are the copies the model runner
   must apply to the KV tensors before the forward pass.
3. After the forward pass, `mark_computed(seq_id)` registers newly completed full blocks in the
   prefix cache.
4. `fork(parent, child)` shares every block; `free(seq_id)` releases them (cached if registered).

Every method that reads or changes tables or the pool holds one lock, so `snapshot()` and `figures()` may
be called from another thread (the memory panel) while the engine runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from localchat.engine.block_pool import BlockPool, HashFn, chain_hash
from localchat.engine.timeline import Timeline, TimelineView


class BlockManagerError(ValueError):
    """A caller asked for something impossible (unknown sequence, bad size...)."""


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the state is unchanged and the caller may wait or preempt."""


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_computed: int = 0
    # For each full block registered or matched in the prefix cache, the content id and hash that
    # later blocks chain on.
    content_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


@dataclass
class PrefixMatch:
    """What the prefix cache holds of a prompt: full blocks (with the content ids and hashes later
    blocks chain on), then maybe one block whose first `borrowed_tokens` tokens continue them."""

    blocks: list[int] = field(default_factory=list)
    content_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    borrowed: int | None = None
    borrowed_tokens: int = 0

    def hit_tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size + self.borrowed_tokens


@dataclass(frozen=True)
class MemoryFigures:
    """The figures named in design.md, at one instant."""

    blocks_total: int
    blocks_used: int
    blocks_cached: int
    blocks_free: int
    block_size: int
    tokens_stored: int
    kv_utilization: float
    blocks_unshared: int
    sharing_savings: float
    cow_copies: int
    preemptions: int
    prefix_hit_tokens: int
    prompt_tokens: int
    prefix_hit_rate: float
    evictions: int
    num_sequences: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BlockInfo:
    block_id: int
    state: str  # "free", "cached" or "used"
    ref_count: int
    num_tokens: int
    owners: tuple[int, ...]


@dataclass(frozen=True)
class MemorySnapshot:
    figures: MemoryFigures
    peaks: dict
    blocks: tuple[BlockInfo, ...]
    tables: dict[int, tuple[int, ...]]
    seq_tokens: dict[int, int]


# Block states in CompactSnapshot.states, one byte per block.
FREE, CACHED, USED = 0, 1, 2
_USED_FROM_BOOL = bytes([FREE, USED]) + bytes(254)  # bytes.translate table: ref count > 0 -> USED


@dataclass(frozen=True)
class CompactSnapshot:
    """The pool for a panel that may hold tens of thousands of blocks: arrays, not one object per block.

    `states[b]` is FREE, CACHED or USED; a used block's ref count is the number of `tables` that hold it
    (invariant 2), and only a table's last block can be partly filled (`seq_tokens` says how far).
    """

    figures: MemoryFigures
    peaks: dict
    states: bytes
    tables: dict[int, tuple[int, ...]]
    seq_tokens: dict[int, int]
    timeline: TimelineView


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        watermark: float = 0.01,
        enable_prefix_cache: bool = True,
        hash_fn: HashFn = chain_hash,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise BlockManagerError(f"block_size must be an integer >= 1, got {block_size!r}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise BlockManagerError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if not 0.0 <= watermark < 1.0:
            raise BlockManagerError(f"watermark must be in [0, 1), got {watermark!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_cache = enable_prefix_cache
        self.watermark_blocks = int(watermark * num_blocks)
        self.pool = BlockPool(num_blocks, block_size, hash_fn)
        self.tables: dict[int, BlockTable] = {}
        self.cow_copies = 0
        self.preemptions = 0
        self.prefix_hit_tokens = 0
        self.prompt_tokens = 0
        self.blocks_unshared = 0  # sum of table lengths: what the live sequences would need unshared
        # Figures at the moment blocks_used peaked, so the peak's utilization and savings are
        # read off one instant; blocks_unshared_peak is the maximum on its own.
        self._peaks = {
            "blocks_used_peak": 0,
            "blocks_unshared_peak": 0,
            "tokens_stored_peak": 0,
            "blocks_unshared_at_used_peak": 0,
        }
        self._lock = threading.RLock()
        self.timeline = Timeline()

    # ---------------------------------------------------------------- helpers
    def _table(self, seq_id: int) -> BlockTable:
        table = self.tables.get(seq_id)
        if table is None:
            raise BlockManagerError(f"unknown or freed sequence {seq_id!r}")
        return table

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_peaks(self) -> None:
        used = self.pool.num_used
        if used > self._peaks["blocks_used_peak"]:
            self._peaks["blocks_used_peak"] = used
            self._peaks["tokens_stored_peak"] = self.pool.tokens_in_used
            self._peaks["blocks_unshared_at_used_peak"] = self.blocks_unshared
        elif used == self._peaks["blocks_used_peak"]:
            # Blocks fill up while the count stands still: keep the fullest moment at this peak.
            if self.pool.tokens_in_used > self._peaks["tokens_stored_peak"]:
                self._peaks["tokens_stored_peak"] = self.pool.tokens_in_used
            if self.blocks_unshared > self._peaks["blocks_unshared_at_used_peak"]:
                self._peaks["blocks_unshared_at_used_peak"] = self.blocks_unshared
        if self.blocks_unshared > self._peaks["blocks_unshared_peak"]:
            self._peaks["blocks_unshared_peak"] = self.blocks_unshared

    def _match_prefix(self, token_ids: Sequence[int], num_blocks: int | None = None) -> PrefixMatch:
        """Cached blocks holding a prefix of `token_ids`, never including the last token: the full
        blocks that match, then the block after them sharing the most leading tokens (borrowed).
        With `num_blocks`, only that many full blocks are tried and nothing is borrowed."""
        match = PrefixMatch()
        if not self.enable_prefix_cache:
            return match
        bs = self.block_size
        parent_hash, parent_cid = 0, 0
        for i in range((len(token_ids) - 1) // bs if num_blocks is None else num_blocks):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self.pool.hash_fn(parent_hash, chunk)
            block_id = self.pool.lookup(h, parent_cid, chunk)
            if block_id is None:
                break
            parent_hash = h
            parent_cid = self.pool.identity[block_id].content_id  # type: ignore[union-attr]
            match.blocks.append(block_id)
            match.content_ids.append(parent_cid)
            match.hashes.append(h)
        if num_blocks is None:
            start = len(match.blocks) * bs
            rest = token_ids[start : min(start + bs, len(token_ids) - 1)]
            if rest:
                match.borrowed, match.borrowed_tokens = self.pool.longest_child_prefix(parent_cid, rest)
        return match

    def _must_copy(self, block_id: int) -> bool:
        """Appending into this block would change what another table or the prefix cache holds."""
        return self.pool.ref_counts[block_id] > 1 or self.pool.identity[block_id] is not None

    def _new_blocks_needed(self, table: BlockTable, num_new_tokens: int) -> int:
        total = table.num_tokens + num_new_tokens
        needed = self._blocks_for(total) - len(table.blocks)
        partial = table.num_tokens % self.block_size
        if num_new_tokens > 0 and partial and self._must_copy(table.blocks[-1]):
            needed += 1  # copy-on-write of the shared (or borrowed) last block
        return needed

    # ------------------------------------------------------------- admission
    @property
    def num_available_blocks(self) -> int:
        with self._lock:
            return self.pool.num_available

    def can_allocate(self, token_ids: Sequence[int], num_new_tokens: int | None = None) -> bool:
        """Could a new sequence with this prompt start now, computing `num_new_tokens` of it
        (default: all uncached tokens), leaving the watermark free for running sequences?"""
        with self._lock:
            return self._admit(token_ids, num_new_tokens)[1]

    def _admit(self, token_ids: Sequence[int], num_new_tokens: int | None) -> tuple[PrefixMatch, bool]:
        """The prefix match a new sequence would take, and whether it fits. A borrowed block costs one
        block more (its copy), so where only that block is missing the borrow is given up instead."""
        match = self._match_prefix(token_ids)
        fits = self._fits(match, len(token_ids), num_new_tokens)
        if not fits and match.borrowed is not None:
            match.borrowed, match.borrowed_tokens = None, 0
            fits = self._fits(match, len(token_ids), num_new_tokens)
        return match, fits

    def _fits(self, match: PrefixMatch, num_tokens: int, num_new_tokens: int | None) -> bool:
        held = match.blocks + ([match.borrowed] if match.borrowed is not None else [])
        reactivated = sum(1 for b in held if self.pool.ref_counts[b] == 0)
        cached_tokens = match.hit_tokens(self.block_size)
        todo = num_tokens - cached_tokens if num_new_tokens is None else num_new_tokens
        # Counted against the full blocks only: a borrowed block is copied before anything lands in it.
        needed = self._blocks_for(cached_tokens + todo) - len(match.blocks)
        return self.pool.num_available - reactivated - needed >= self.watermark_blocks

    def can_append(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        with self._lock:
            table = self._table(seq_id)
            return self._new_blocks_needed(table, num_new_tokens) <= self.pool.num_available

    def blocks_needed_to_append(self, seq_id: int, num_new_tokens: int = 1) -> int:
        with self._lock:
            return self._new_blocks_needed(self._table(seq_id), num_new_tokens)

    # ------------------------------------------------------------- operations
    def allocate(self, seq_id: int, token_ids: Sequence[int], num_new_tokens: int | None = None) -> int:
        """Create the table for a new sequence, sharing cached prompt blocks.

        Returns the number of prompt tokens already computed (the prefix-cache hit). The rest of
        the prompt is reserved by `append` as it is computed, so a long prompt prefilled in chunks
        takes blocks only as its chunks run. `num_new_tokens` is the first chunk, as asked of
        `can_allocate`, so both make the same choice about borrowing.
        """
        with self._lock:
            if seq_id in self.tables:
                raise BlockManagerError(f"sequence {seq_id!r} already has a block table")
            if len(token_ids) == 0:
                raise BlockManagerError("cannot allocate an empty prompt")
            match = self._admit(token_ids, num_new_tokens)[0]
            blocks = match.blocks + ([match.borrowed] if match.borrowed is not None else [])
            for block_id in blocks:
                self.pool.acquire(block_id)
            hit = match.hit_tokens(self.block_size)
            self.tables[seq_id] = BlockTable(
                blocks=blocks,
                num_tokens=hit,
                num_computed=hit,
                content_ids=match.content_ids,
                block_hashes=match.hashes,
            )
            self.blocks_unshared += len(blocks)
            self.prefix_hit_tokens += hit
            self.prompt_tokens += len(token_ids)
            self._update_peaks()
            self._tick()
            return hit

    def append(self, seq_id: int, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Reserve slots for `token_ids` at the end of the sequence; returns CoW block copies.

        Raises OutOfBlocks (state unchanged) if the pool cannot supply the blocks.
        """
        with self._lock:
            table = self._table(seq_id)
            if len(token_ids) == 0:
                return []
            if self._new_blocks_needed(table, len(token_ids)) > self.pool.num_available:
                raise OutOfBlocks(f"sequence {seq_id!r} needs more KV blocks than are available")
            copies: list[tuple[int, int]] = []
            bs = self.block_size
            pos = 0
            grew = False
            while pos < len(token_ids):
                offset = table.num_tokens % bs
                if offset == 0:
                    table.blocks.append(self.pool.take_free())
                    self.blocks_unshared += 1
                    grew = True
                else:
                    last = table.blocks[-1]
                    if self._must_copy(last):
                        fresh = self.pool.take_free()
                        self.pool.copy_tokens(last, fresh, offset)
                        self.pool.release(last)
                        table.blocks[-1] = fresh
                        copies.append((last, fresh))
                        self.cow_copies += 1
                        self.timeline.event("cow", seq_id)
                        grew = True
                take = min(bs - offset, len(token_ids) - pos)
                self.pool.write_tokens(table.blocks[-1], token_ids[pos : pos + take])
                table.num_tokens += take
                pos += take
            self._update_peaks()
            if grew:
                self._tick()
            return copies

    def mark_computed(self, seq_id: int, num_computed: int | None = None) -> None:
        """The KV of the first `num_computed` tokens (default: all reserved) is now written;
        full blocks among them become findable by later prompts."""
        with self._lock:
            table = self._table(seq_id)
            n = table.num_tokens if num_computed is None else num_computed
            if not 0 <= n <= table.num_tokens:
                raise BlockManagerError(
                    f"num_computed {n} outside [0, {table.num_tokens}] for sequence {seq_id!r}"
                )
            table.num_computed = max(table.num_computed, n)
            if not self.enable_prefix_cache:
                return
            bs = self.block_size
            for i in range(len(table.content_ids), table.num_computed // bs):
                parent_hash = table.block_hashes[-1] if table.block_hashes else 0
                parent_cid = table.content_ids[-1] if table.content_ids else 0
                block_id = table.blocks[i]
                chunk = tuple(self.pool.tokens[block_id])
                h = self.pool.hash_fn(parent_hash, chunk)
                # The same prefix may already be registered in another block (two identical
                # prompts computed side by side): chain on that one so later blocks match too.
                existing = self.pool.lookup(h, parent_cid, chunk)
                if existing is not None:
                    cid = self.pool.identity[existing].content_id  # type: ignore[union-attr]
                else:
                    cid = self.pool.register(block_id, h, parent_cid)
                table.content_ids.append(cid)
                table.block_hashes.append(h)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent; nothing is copied."""
        with self._lock:
            parent = self._table(parent_id)
            if child_id in self.tables:
                raise BlockManagerError(f"sequence {child_id!r} already has a block table")
            for block_id in parent.blocks:
                self.pool.acquire(block_id)
            self.tables[child_id] = BlockTable(
                blocks=list(parent.blocks),
                num_tokens=parent.num_tokens,
                num_computed=parent.num_computed,
                content_ids=list(parent.content_ids),
                block_hashes=list(parent.block_hashes),
            )
            self.blocks_unshared += len(parent.blocks)
            self._update_peaks()
            self.timeline.event("fork", child_id)
            self._tick()

    def free(self, seq_id: int) -> None:
        """Release every block; the tail goes first so that LRU eviction keeps shared heads."""
        with self._lock:
            table = self._table(seq_id)
            del self.tables[seq_id]
            for block_id in reversed(table.blocks):
                self.pool.release(block_id)
            self.blocks_unshared -= len(table.blocks)
            self._tick()

    def record_preemption(self) -> None:
        with self._lock:
            self.preemptions += 1
            self.timeline.event("preempt")

    def reset_prefix_cache(self) -> int:
        with self._lock:
            return self.pool.evict_all_cached()

    def reset_peaks(self) -> None:
        with self._lock:
            for key in self._peaks:
                self._peaks[key] = 0
            self._update_peaks()

    # ----------------------------------------------------------------- queries
    def has(self, seq_id: int) -> bool:
        return seq_id in self.tables

    def block_table(self, seq_id: int) -> list[int]:
        with self._lock:
            return list(self._table(seq_id).blocks)

    def num_tokens(self, seq_id: int) -> int:
        with self._lock:
            return self._table(seq_id).num_tokens

    def num_computed(self, seq_id: int) -> int:
        with self._lock:
            return self._table(seq_id).num_computed

    def slots(self, seq_id: int, start: int, count: int) -> list[int]:
        """Physical slot (block_id * block_size + offset) of tokens [start, start + count)."""
        with self._lock:
            table = self._table(seq_id)
            if start < 0 or count < 0 or start + count > table.num_tokens:
                raise BlockManagerError(f"slots [{start}, {start + count}) outside the sequence")
            bs = self.block_size
            blocks = table.blocks
            return [blocks[p // bs] * bs + p % bs for p in range(start, start + count)]

    def read_tokens(self, seq_id: int) -> list[int]:
        """The token ids this sequence sees through its table (what its KV was computed from)."""
        with self._lock:
            table = self._table(seq_id)
            out: list[int] = []
            for block_id in table.blocks:
                out.extend(self.pool.tokens[block_id])
            return out[: table.num_tokens]  # a borrowed last block holds more than this table uses

    def figures(self) -> MemoryFigures:
        with self._lock:
            used = self.pool.num_used
            stored = self.pool.tokens_in_used
            return MemoryFigures(
                blocks_total=self.num_blocks,
                blocks_used=used,
                blocks_cached=self.pool.num_cached,
                blocks_free=self.pool.num_free,
                block_size=self.block_size,
                tokens_stored=stored,
                kv_utilization=stored / (used * self.block_size) if used else 0.0,
                blocks_unshared=self.blocks_unshared,
                sharing_savings=1.0 - used / self.blocks_unshared if self.blocks_unshared else 0.0,
                cow_copies=self.cow_copies,
                preemptions=self.preemptions,
                prefix_hit_tokens=self.prefix_hit_tokens,
                prompt_tokens=self.prompt_tokens,
                prefix_hit_rate=self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
                evictions=self.pool.evictions,
                num_sequences=len(self.tables),
            )

    def peaks(self) -> dict:
        """Peaks since start or `reset_peaks`, under the same names with a `_peak` suffix."""
        with self._lock:
            p = dict(self._peaks)
            used, unshared = p["blocks_used_peak"], p["blocks_unshared_at_used_peak"]
            p["kv_utilization_peak"] = p["tokens_stored_peak"] / (used * self.block_size) if used else 0.0
            p["sharing_savings_peak"] = 1.0 - used / unshared if unshared else 0.0
            return p

    def snapshot(self) -> MemorySnapshot:
        """A consistent copy for the memory panel, cheap enough to take while the engine runs."""
        with self._lock:
            owners: dict[int, list[int]] = {}
            for seq_id, table in self.tables.items():
                for block_id in table.blocks:
                    owners.setdefault(block_id, []).append(seq_id)
            pool = self.pool
            cached = set(pool.cached_blocks_lru())
            blocks = tuple(
                BlockInfo(
                    block_id=b,
                    state="used" if pool.ref_counts[b] else ("cached" if b in cached else "free"),
                    ref_count=pool.ref_counts[b],
                    num_tokens=len(pool.tokens[b]),
                    owners=tuple(owners.get(b, ())),
                )
                for b in range(self.num_blocks)
            )
            return MemorySnapshot(
                figures=self.figures(),
                peaks=self.peaks(),
                blocks=blocks,
                tables={s: tuple(t.blocks) for s, t in self.tables.items()},
                seq_tokens={s: t.num_tokens for s, t in self.tables.items()},
            )

    # ------------------------------------------------------ the memory panel's queries
    def _num_shared(self) -> int:
        counts = self.pool.ref_counts  # list.count runs in C: cheap even for tens of thousands of blocks
        return self.num_blocks - counts.count(0) - counts.count(1)

    def _tick(self) -> None:
        """Sample the timeline if its interval has passed (called where blocks change hands)."""
        if self.timeline.due():
            self.timeline.sample(self.pool.num_used, self.pool.num_cached, self._num_shared())

    def compact_snapshot(self, since: float | None = None) -> CompactSnapshot:
        """The pool as arrays (one byte per block) plus the timeline newer than `since`."""
        with self._lock:
            pool = self.pool
            self.timeline.sample(pool.num_used, pool.num_cached, self._num_shared())
            states = bytearray(map(bool, pool.ref_counts)).translate(_USED_FROM_BOOL)
            for block_id in pool.cached_blocks_lru():
                states[block_id] = CACHED
            return CompactSnapshot(
                figures=self.figures(),
                peaks=self.peaks(),
                states=bytes(states),
                tables={s: tuple(t.blocks) for s, t in self.tables.items()},
                seq_tokens={s: t.num_tokens for s, t in self.tables.items()},
                timeline=self.timeline.view(since),
            )

    def cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of `token_ids` the prefix cache holds now (whole blocks only).

        Nothing changes: no block is taken or touched, so asking never reorders the LRU.
        """
        with self._lock:
            return len(self._match_prefix(token_ids, len(token_ids) // self.block_size).blocks) * self.block_size

    def block_token_ids(self, block_ids: Sequence[int]) -> dict[int, list[int]]:
        """The token ids each block holds now (free blocks hold none)."""
        with self._lock:
            return {b: list(self.pool.tokens[b]) for b in block_ids if 0 <= b < self.num_blocks}

    def check_invariants(self) -> None:
        """Assert design.md's invariants 1 and 2 (used by tests and debug runs)."""
        with self._lock:
            pool = self.pool
            holders = [0] * self.num_blocks
            for table in self.tables.values():
                for block_id in table.blocks:
                    holders[block_id] += 1
                assert len(table.blocks) == self._blocks_for(table.num_tokens)
            cached = set(pool.cached_blocks_lru())
            free = set(pool._free)
            assert len(free) == pool.num_free, "a block is twice in the free list"
            used = 0
            for b in range(self.num_blocks):
                assert pool.ref_counts[b] == holders[b], f"block {b}: ref {pool.ref_counts[b]} != {holders[b]}"
                states = (pool.ref_counts[b] > 0) + (b in cached) + (b in free)
                assert states == 1, f"block {b} is in {states} states"
                used += pool.ref_counts[b] > 0
                if b in cached:
                    assert pool.identity[b] is not None
                if pool.identity[b] is not None:  # registered blocks are full and never written again
                    assert len(pool.tokens[b]) == self.block_size
                if b in free:
                    assert pool.identity[b] is None and not pool.tokens[b]
            assert used == pool.num_used
            assert used + len(cached) + len(free) == self.num_blocks
            assert pool.tokens_in_used == sum(len(pool.tokens[b]) for b in range(self.num_blocks) if pool.ref_counts[b])
            assert self.blocks_unshared == sum(len(t.blocks) for t in self.tables.values())
