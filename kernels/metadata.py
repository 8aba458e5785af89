"""Per-step attention metadata shared by the model runner, the model and the kernels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Describes one flattened batch of new tokens over paged K/V.

    Tokens of sequence s are rows query_start_loc[s]:query_start_loc[s+1] of the flattened batch;
    they are the last query_lens[s] tokens of a context of context_lens[s] tokens.
    """

    slot_mapping: torch.Tensor  # int64 [T]: block_id * block_size + offset per new token; -1 = don't write
    block_tables: torch.Tensor  # int32 [S, max_blocks], padded with 0
    query_start_loc: torch.Tensor  # int32 [S + 1], cumulative query lengths
    context_lens: torch.Tensor  # int32 [S], context INCLUDING this step's new tokens
    query_lens: list[int]
    context_lens_list: list[int]
    max_query_len: int
    max_context_len: int
    block_size: int
    # Per-step values a backend derives once and reuses in every layer (e.g. gather indices, masks).
    scratch: dict = field(default_factory=dict, repr=False, compare=False)
    # The kernels module an engine asked for (kernels.select_backend); None: the tensors' device decides.
    backend: object = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens))

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1 and all(q == 1 for q in self.query_lens)


def build_metadata(
    block_tables: list[list[int]],
    context_lens: list[int],
    query_lens: list[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Build metadata from python lists (the model runner's and the tests' common path).

    Sequence s writes its query_lens[s] new tokens at positions
    context_lens[s] - query_lens[s] .. context_lens[s] - 1 of its block table.
    """
    if not (len(block_tables) == len(context_lens) == len(query_lens)):
        raise ValueError("block_tables, context_lens and query_lens must have one entry per sequence")
    slots: list[int] = []
    for table, ctx, q in zip(block_tables, context_lens, query_lens):
        if q < 0 or q > ctx:
            raise ValueError(f"query length {q} must be within 0..context length {ctx}")
        if len(table) * block_size < ctx:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
        for pos in range(ctx - q, ctx):
            slots.append(table[pos // block_size] * block_size + pos % block_size)

    max_blocks = max((len(t) for t in block_tables), default=0)
    padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), max_blocks),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_lens=list(query_lens),
        context_lens_list=list(context_lens),
        max_query_len=max(query_lens, default=0),
        max_context_len=max(context_lens, default=0),
        block_size=block_size,
    )
