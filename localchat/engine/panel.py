"""What the memory panel and the conversation overview ask the engine, run in the engine's loop.

Clients call these through `EngineClient.call(fn, *args)`, so they run between two steps, in the
engine's own thread or process, and see one consistent state. Each is a module-level function (an
engine process receives it by name) and returns small picklable values: the pool as arrays, never
one object per block, and token ids rather than text (the UI process decodes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from localchat.engine.block_manager import CompactSnapshot


@dataclass(frozen=True)
class LiveSequence:
    """A live sequence and the request it serves, so the UI can name what owns each block."""

    seq_id: int
    request_id: str
    index: int  # sample or beam index within its request
    num_tokens: int
    status: str  # "waiting" or "running"
    beam: bool


@dataclass(frozen=True)
class PanelSnapshot:
    memory: CompactSnapshot
    sequences: tuple[LiveSequence, ...]
    block_bytes: int  # K and V of one block in every layer


def panel_snapshot(engine, since: float | None = None) -> PanelSnapshot:
    """The pool, its timeline newer than `since` (engine clock), and who owns the live sequences."""
    live = []
    for request in list(engine.requests.values()):
        for seq in request.seqs:
            if not seq.is_finished:
                live.append(LiveSequence(seq.seq_id, seq.request_id, seq.index, seq.num_tokens,
                                         seq.status.value, request.beam is not None))
    manager = engine.block_manager
    return PanelSnapshot(
        memory=manager.compact_snapshot(since),
        sequences=tuple(live),
        block_bytes=engine.runner.kv_cache_bytes // max(manager.num_blocks, 1),
    )


def block_tokens(engine, block_ids: Sequence[int]) -> dict[int, list[int]]:
    """The token ids the given blocks hold now (hovering a block in the panel shows their text)."""
    return engine.block_manager.block_token_ids([int(b) for b in block_ids])


def cached_prefix_tokens(engine, id_lists: Sequence[Sequence[int]]) -> list[int]:
    """For each token list, how many of its leading tokens the prefix cache holds now."""
    manager = engine.block_manager
    return [manager.cached_prefix_tokens(ids) for ids in id_lists]
