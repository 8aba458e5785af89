"""Continuous batching: every step serves all running sequences plus waiting prefills.

One step's work is a list of (sequence, number of new tokens). A running sequence in decode brings
one token; a prompt brings a chunk of up to the remaining token budget, so a long prompt is
prefilled over several steps while the others keep decoding. When the pool runs out of blocks,
the newest running sequences are preempted: their blocks are freed and they go back to the front
of the queue, to be recomputed later (cheaply, since their finished blocks stay in the prefix
cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from localchat import settings
from localchat.engine.block_manager import BlockManager
from localchat.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = settings.DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = settings.DEFAULT_MAX_NUM_BATCHED_TOKENS

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class ScheduledWork:
    seq: Sequence
    num_new_tokens: int
    # The sequence's block table after this step's slots were reserved (the model runner reads K/V
    # through it; only the scheduler touches the block manager).
    block_table: list[int]
    start: int = -1  # the sequence's num_computed when scheduled
    # After this step every token of the sequence is computed, so it samples the next one.
    completes_sequence: bool = False

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed
        self.completes_sequence = self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    work: list[ScheduledWork] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences stopped because the whole pool could not hold them.
    finished: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(w.num_new_tokens for w in self.work)

    def __bool__(self) -> bool:
        return bool(self.work)


class Scheduler:
    """Owns the block manager: every table change (allocate, append, fork, free) goes through here."""

    def __init__(self, block_manager: BlockManager, config: SchedulerConfig | None = None) -> None:
        self.block_manager = block_manager
        self.config = config or SchedulerConfig()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # ------------------------------------------------------------------ queues
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork that already holds a block table joins the running batch directly."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish or abort a sequence wherever it is; its blocks are released at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.block_manager.has(seq.seq_id):
            self.block_manager.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` continues `parent`: it shares every block if the parent holds a table (nothing is
        copied) and joins the running batch, else (the parent was preempted) it queues and recomputes
        from the prefix cache like the parent will."""
        if self.block_manager.has(parent.seq_id):
            child.num_computed = min(parent.num_computed, child.num_tokens)
            self.block_manager.fork(parent.seq_id, child.seq_id)
            self.add_running(child)
        else:
            child.num_computed = 0
            self.add(child)

    # --------------------------------------------------------------- preemption
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        if self.block_manager.has(seq.seq_id):
            self.block_manager.mark_computed(seq.seq_id, seq.num_computed)
            self.block_manager.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.block_manager.record_preemption()
        out.preempted.append(seq)

    # ----------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()

        # Running sequences first, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:  # waiting on a fork's first token; nothing to compute
                i += 1
                continue
            while not self.block_manager.can_append(seq.seq_id, n):
                victim = next((s for s in reversed(self.running) if s is not seq and s.seq_id not in scheduled), None)
                if victim is None:
                    break
                self._preempt(victim, out)
            if not self.block_manager.can_append(seq.seq_id, n):
                # Alone and still too big for the pool: shrink the chunk, else wait for memory.
                n = self._largest_chunk(seq, n)
                if n == 0:
                    if len(self.running) == 1 and not out.work:
                        # It holds the whole pool and still cannot grow: stop it where it is.
                        self.finish(seq, "length")
                        out.finished.append(seq)
                        continue
                    self._preempt(seq, out)
                    continue
            out.copies.extend(self.block_manager.append(seq.seq_id, seq.token_ids[seq.num_computed : seq.num_computed + n]))
            out.work.append(ScheduledWork(seq, n, self.block_manager.block_table(seq.seq_id)))
            scheduled.add(seq.seq_id)
            budget -= n
            i += 1

        # Then new prompts in arrival order, unless memory is already tight this step.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.has(seq.seq_id):
                # With others running, wait until the whole first chunk fits; alone, any progress will do.
                chunk = min(budget, seq.num_tokens) if self.running else 1
                if not self.block_manager.can_allocate(seq.token_ids, chunk):
                    break
                hit = self.block_manager.allocate(seq.seq_id, seq.token_ids, chunk)
                seq.num_computed = hit
                seq.prefix_hit_tokens += hit
            n = min(seq.num_tokens - seq.num_computed, budget)
            n = self._largest_chunk(seq, n)
            if n == 0:
                # Don't sit on cache-hit blocks while waiting: others may need them to finish.
                self.block_manager.free(seq.seq_id)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.copies.extend(self.block_manager.append(seq.seq_id, seq.token_ids[seq.num_computed : seq.num_computed + n]))
            out.work.append(ScheduledWork(seq, n, self.block_manager.block_table(seq.seq_id)))
            scheduled.add(seq.seq_id)
            budget -= n
        return out

    def _largest_chunk(self, seq: Sequence, n: int) -> int:
        """The most of the next `n` tokens that the free blocks can take now."""
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.block_manager.can_append(seq.seq_id, mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def commit(self, out: SchedulerOutput) -> None:
        """After the forward pass: the scheduled tokens' K/V is now in the cache."""
        for w in out.work:
            w.seq.num_computed += w.num_new_tokens
            self.block_manager.mark_computed(w.seq.seq_id, w.seq.num_computed)
