"""Paged-attention ops in plain PyTorch: the CPU path (also correct on CUDA tensors).

Cache layout, shared with every backend: k_cache / v_cache are [num_blocks, block_size, kv_heads, head_dim];
the slot of token position p of a sequence is block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter this step's K/V ([T, kv_heads, head_dim]) into their slots; slot -1 is skipped."""
    if slot_mapping.numel() == 0:
        return
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    k_flat = k_cache.view(num_blocks * block_size, kv_heads, head_dim)
    v_flat = v_cache.view(num_blocks * block_size, kv_heads, head_dim)
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    k_flat.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def copy_blocks(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    src: torch.Tensor,
    dst: torch.Tensor,
) -> None:
    """Copy whole blocks src[i] -> dst[i] in every layer (copy-on-write before a forward pass)."""
    if src.numel() == 0:
        return
    src = src.to(device=k_caches[0].device, dtype=torch.long)
    dst = dst.to(device=k_caches[0].device, dtype=torch.long)
    for cache in (*k_caches, *v_caches):
        # index_select snapshots the sources first, so a block that is both a source and a destination
        # in the same call still contributes its old contents.
        cache.index_copy_(0, dst, cache.index_select(0, src))


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of each sequence's new queries ([T, heads, head_dim]) over its paged context.

    The K/V of this step's tokens must already be written (write_kv). Query i of a sequence with q new
    tokens and context c sits at position c - q + i and sees keys 0..c - q + i (bottom-right causal).
    """
    if meta.is_decode_only:
        return _decode(query, k_cache, v_cache, meta, scale)
    return _per_sequence(query, k_cache, v_cache, meta, scale)


def _decode(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    # One query per sequence: gather every sequence's blocks in one index_select (padded to the longest
    # context) and mask by length, so the whole batch is a single SDPA call instead of a python loop.
    num_seqs = meta.num_seqs
    _, block_size, kv_heads, head_dim = k_cache.shape
    length = max(meta.max_context_len, 1)
    num_blocks = -(-length // block_size)
    index, mask = _decode_plan(meta, num_blocks, length, query.device)
    keys = k_cache.index_select(0, index).view(num_seqs, num_blocks * block_size, kv_heads, head_dim)
    values = v_cache.index_select(0, index).view(num_seqs, num_blocks * block_size, kv_heads, head_dim)
    keys, values = keys[:, :length].transpose(1, 2), values[:, :length].transpose(1, 2)
    dtype = _compute_dtype(query)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2).to(dtype), keys.to(dtype), values.to(dtype), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2).to(query.dtype)


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    # PyTorch's CPU flash attention is ~6x slower in bfloat16 than float32 for decode-sized queries and
    # no faster for prefill, so on the CPU attention runs in float32 (the K/V copy is small).
    if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return query.dtype


def _decode_plan(
    meta: AttentionMetadata, num_blocks: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flattened block ids and length mask for a decode step, built once and shared by every layer."""
    plan = meta.scratch.get("decode")
    if plan is None:
        # index_select, not tensor[int32_index]: advanced indexing with int32 indices is ~200x slower on CPU.
        index = meta.block_tables[:, :num_blocks].reshape(-1)
        mask = None
        if min(meta.context_lens_list) != length:
            valid = torch.arange(length, device=device)[None, :] < meta.context_lens[:, None]
            # A padding sequence (context 0) would mask every key and give NaN; its output is unused.
            valid[:, 0] = True
            mask = valid[:, None, None, :]
        plan = meta.scratch["decode"] = (index, mask)
    return plan


def _per_sequence(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    _, block_size, kv_heads, head_dim = k_cache.shape
    dtype = _compute_dtype(query)
    out = torch.empty_like(query)
    start = 0
    for seq, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list)):
        if q_len == 0:
            continue
        end = start + q_len
        num_blocks = -(-ctx // block_size)
        table = meta.block_tables[seq, :num_blocks]
        keys = k_cache.index_select(0, table).view(num_blocks * block_size, kv_heads, head_dim)[:ctx].transpose(0, 1)
        values = v_cache.index_select(0, table).view(num_blocks * block_size, kv_heads, head_dim)[:ctx].transpose(0, 1)
        queries = query[start:end].transpose(0, 1)
        mask, causal = None, False
        if q_len == ctx:
            causal = q_len > 1  # no cached prefix: top-left and bottom-right alignment coincide
        elif q_len > 1:
            mask = torch.ones(q_len, ctx, dtype=torch.bool, device=query.device).tril_(ctx - q_len)
        seq_out = F.scaled_dot_product_attention(
            queries.unsqueeze(0).to(dtype),
            keys.unsqueeze(0).to(dtype),
            values.unsqueeze(0).to(dtype),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = seq_out[0].transpose(0, 1)
        start = end
    return out
