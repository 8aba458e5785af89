"""The pool of physical KV blocks: ref counts, the free list, and the prefix cache.

A physical block is in exactly one state at any time:
- used: ref count >= 1 (held by at least one block table);
- cached: ref count 0, full and registered under its chained hash; it still holds a reusable
  prefix and is evicted in LRU order only when a free block is needed;
- free: ref count 0, holds nothing reusable.

The pool also keeps the token ids stored in each block. They mirror what the KV tensors hold, so
a prefix-cache hit is verified token by token and tests can read a sequence back through its
table. Registered blocks are also indexed by the block before them, so a prompt whose next block
differs from every cached one can still borrow the leading tokens it shares with one of them.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HashFn = Callable[[int, tuple[int, ...]], int]


def chain_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given the hash of the block before it (0 for the first block)."""
    return hash((parent_hash, token_ids))


@dataclass
class CachedIdentity:
    """What a registered block holds, so a hash hit can be verified exactly.

    `content_id` is never reused, and `parent_content_id` names the block before it; matching both
    the parent's id and the token ids proves by induction that the whole prefix is identical,
    even when the hash function collides.
    """

    block_hash: int
    content_id: int
    parent_content_id: int


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, hash_fn: HashFn = chain_hash) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hash_fn = hash_fn
        self.ref_counts = [0] * num_blocks
        self.tokens: list[list[int]] = [[] for _ in range(num_blocks)]
        self.identity: list[CachedIdentity | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Insertion order is LRU order: the first key is the least recently released block.
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[int, list[int]] = {}
        self._children: dict[int, list[int]] = {}  # parent content id -> registered blocks after it
        self._next_content_id = 1
        self.num_used = 0
        self.tokens_in_used = 0
        self.evictions = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    # ------------------------------------------------------------- allocation
    def take_free(self) -> int:
        """A block with no content and ref count 1; evicts the LRU cached block if none is free."""
        if self._free:
            block_id = self._free.popleft()
        elif self._cached:
            block_id, _ = self._cached.popitem(last=False)
            self._unregister(block_id)
            self.tokens[block_id] = []
            self.evictions += 1
        else:
            raise MemoryError("no free KV blocks")
        self.ref_counts[block_id] = 1
        self.num_used += 1
        return block_id

    def acquire(self, block_id: int) -> None:
        """One more table holds `block_id` (a fork, or a prefix-cache hit)."""
        if self.ref_counts[block_id] == 0:
            if block_id not in self._cached:
                raise AssertionError(f"block {block_id} is free and cannot be shared")
            del self._cached[block_id]
            self.num_used += 1
            self.tokens_in_used += len(self.tokens[block_id])
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        """One table dropped `block_id`; at ref count 0 it becomes cached (if registered) or free."""
        if self.ref_counts[block_id] <= 0:
            raise AssertionError(f"block {block_id} released more often than acquired")
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] > 0:
            return
        self.num_used -= 1
        self.tokens_in_used -= len(self.tokens[block_id])
        if self.identity[block_id] is not None:
            self._cached[block_id] = None
        else:
            self.tokens[block_id] = []
            self._free.append(block_id)

    def write_tokens(self, block_id: int, token_ids: Sequence[int]) -> None:
        if self.ref_counts[block_id] != 1:
            raise AssertionError(f"write into block {block_id} with ref count {self.ref_counts[block_id]}")
        if len(self.tokens[block_id]) + len(token_ids) > self.block_size:
            raise AssertionError(f"block {block_id} overflow")
        self.tokens[block_id].extend(token_ids)
        self.tokens_in_used += len(token_ids)

    def copy_tokens(self, src: int, dst: int, count: int | None = None) -> None:
        """Give `dst` the first `count` (default: all) token ids of `src`, as a copy-on-write does."""
        self.tokens[dst] = self.tokens[src][:count]
        self.tokens_in_used += len(self.tokens[dst])

    # ----------------------------------------------------------- prefix cache
    def lookup(self, block_hash: int, parent_content_id: int, token_ids: Sequence[int]) -> int | None:
        """A registered block holding exactly `token_ids` after the block `parent_content_id`."""
        for block_id in self._by_hash.get(block_hash, ()):
            ident = self.identity[block_id]
            if (
                ident is not None
                and ident.parent_content_id == parent_content_id
                and self.tokens[block_id] == list(token_ids)
            ):
                return block_id
        return None

    def longest_child_prefix(self, parent_content_id: int, token_ids: Sequence[int]) -> tuple[int | None, int]:
        """The registered block after `parent_content_id` whose leading tokens match most of
        `token_ids`, and how many match: (None, 0) when none starts with `token_ids[0]`."""
        best, best_len = None, 0
        for block_id in self._children.get(parent_content_id, ()):
            held = self.tokens[block_id]
            n = 0
            for a, b in zip(held, token_ids):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = block_id, n
        return best, best_len

    def register(self, block_id: int, block_hash: int, parent_content_id: int) -> int:
        """Make a full, computed block findable by later prompts; returns its content id."""
        existing = self.identity[block_id]
        if existing is not None:
            return existing.content_id
        content_id = self._next_content_id
        self._next_content_id += 1
        self.identity[block_id] = CachedIdentity(block_hash, content_id, parent_content_id)
        self._by_hash.setdefault(block_hash, []).append(block_id)
        self._children.setdefault(parent_content_id, []).append(block_id)
        return content_id

    def _unregister(self, block_id: int) -> None:
        ident = self.identity[block_id]
        if ident is None:
            return
        bucket = self._by_hash[ident.block_hash]
        bucket.remove(block_id)
        if not bucket:
            del self._by_hash[ident.block_hash]
        siblings = self._children[ident.parent_content_id]
        siblings.remove(block_id)
        if not siblings:
            del self._children[ident.parent_content_id]
        self.identity[block_id] = None

    def evict_all_cached(self) -> int:
        """Drop every cached block (e.g. when the prefix cache is reset); returns how many."""
        count = 0
        while self._cached:
            block_id, _ = self._cached.popitem(last=False)
            self._unregister(block_id)
            self.tokens[block_id] = []
            self._free.append(block_id)
            count += 1
        return count

    def cached_blocks_lru(self) -> list[int]:
        return list(self._cached)
