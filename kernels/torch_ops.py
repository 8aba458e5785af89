"""Paged-attention ops in plain PyTorch: correct on any device; the reference for the native CPU kernel
and its fallback where that cannot be built (kernels/cpu_native.py).

Cache layout, shared with every backend: k_cache / v_cache are [num_blocks, block_size, kv_heads, head_dim];
the slot of token position p of a sequence is block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

import os
import threading

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
    keep = _skipped_slots(slot_mapping)
    if keep is not None:
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    k_flat.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


_last_slots: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)


def _skipped_slots(slot_mapping: torch.Tensor) -> torch.Tensor | None:
    """Mask of slots to keep when some are -1, else None. Every layer of a step passes the same
    slot_mapping tensor, so the check (a device sync) runs once per step, not once per layer; the cache
    holds a reference to that tensor, so identity can't be mistaken for another one."""
    global _last_slots
    if _last_slots[0] is slot_mapping:
        return _last_slots[1]
    keep = slot_mapping >= 0 if bool((slot_mapping < 0).any()) else None
    _last_slots = (slot_mapping, keep)
    return keep


class _Buffers(threading.local):
    """Grow-only scratch tensors reused across layers and steps (one set per thread).

    Fresh memory is slow to touch on these VMs (0.5-1.6 GB/s the first time), so gathering a step's K/V
    into newly allocated tensors costs several times the copy itself; reusing one buffer avoids that.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        # Tensors made under inference_mode can't be written outside it (and the reverse is costly): keep both.
        key = (name, dtype, device, torch.is_inference_mode_enabled())
        buf = self._store.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1 << 16, int(buf.numel() * 1.5) if buf is not None else 0), dtype=dtype, device=device)
            self._store[key] = buf
        return buf[:numel].view(shape)


_buffers = _Buffers()


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
    split = mixed_decode_split(meta)
    if split is None:
        return prompt_attention(query, k_cache, v_cache, meta, scale)
    decode_meta, rows = split
    out = prompt_attention(query, k_cache, v_cache, meta, scale, skip_decode=True)
    out.index_copy_(0, rows, _decode(query.index_select(0, rows), k_cache, v_cache, decode_meta, scale))
    return out


def mixed_decode_split(meta: AttentionMetadata) -> tuple[AttentionMetadata, torch.Tensor] | None:
    """For a step mixing prompt chunks with >= 2 decoding sequences: metadata for the single-token rows
    alone and their token rows, so they go through a batched decode path instead of one SDPA call each."""
    if "mixed" in meta.scratch:
        return meta.scratch["mixed"]
    seqs = [s for s, q in enumerate(meta.query_lens) if q == 1]
    split = None
    if len(seqs) >= 2:
        device = meta.block_tables.device
        sel = torch.tensor(seqs, dtype=torch.long, device=device)
        starts = meta.query_start_loc.tolist()
        rows = torch.tensor([starts[s] for s in seqs], dtype=torch.long, device=device)
        ctx = [meta.context_lens_list[s] for s in seqs]
        decode_meta = AttentionMetadata(
            slot_mapping=meta.slot_mapping[:0],
            block_tables=meta.block_tables.index_select(0, sel),
            query_start_loc=torch.arange(len(seqs) + 1, dtype=torch.int32, device=device),
            context_lens=meta.context_lens.index_select(0, sel),
            query_lens=[1] * len(seqs),
            context_lens_list=ctx,
            max_query_len=1,
            max_context_len=max(ctx),
            block_size=meta.block_size,
        )
        split = (decode_meta, rows)
    meta.scratch["mixed"] = split
    return split


def _decode(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    # One query per sequence. Sequences are sorted by context length and taken a few at a time, each
    # group padded only to its own longest context: padding every sequence to the batch's longest (a
    # 1,500-token prompt next to 50-token ones) multiplied the K/V gathered per step several times.
    # Gathers go into reused buffers (see _Buffers), and on the CPU the group's K/V is converted to
    # float32 once, head-major, which is the layout SDPA's kernel reads fastest.
    _, block_size, kv_heads, head_dim = k_cache.shape
    dtype = _compute_dtype(query)
    groups = _decode_plan(meta, block_size, query.device)
    if len(groups) == 1 and groups[0][0] is None:
        return _decode_group(query, k_cache, v_cache, groups[0], block_size, dtype, scale).to(query.dtype)
    out = torch.empty_like(query)
    for group in groups:
        sel = group[0]
        part = _decode_group(query.index_select(0, sel), k_cache, v_cache, group, block_size, dtype, scale)
        out.index_copy_(0, sel, part.to(query.dtype))
    return out


def _decode_group(query, k_cache, v_cache, group, block_size, dtype, scale) -> torch.Tensor:
    _, blocks, num_blocks, length, mask, views = group
    key = (k_cache.dtype, k_cache.shape[1:], dtype, k_cache.device, torch.is_inference_mode_enabled())
    bufs = views.get(key)
    if bufs is None:
        # Every layer of the step gathers the same shapes: make the buffer views once per step.
        _, _, kv_heads, head_dim = k_cache.shape
        g = query.shape[0]
        shape = (g * num_blocks, block_size, kv_heads, head_dim)
        kbuf = _buffers.get("k", shape, k_cache.dtype, k_cache.device)
        vbuf = _buffers.get("v", shape, v_cache.dtype, v_cache.device)
        keys = kbuf.view(g, num_blocks * block_size, kv_heads, head_dim)[:, :length].transpose(1, 2)
        values = vbuf.view(g, num_blocks * block_size, kv_heads, head_dim)[:, :length].transpose(1, 2)
        k32 = v32 = None
        if dtype != k_cache.dtype:
            k32 = _buffers.get("k32", (g, kv_heads, length, head_dim), dtype, k_cache.device)
            v32 = _buffers.get("v32", (g, kv_heads, length, head_dim), dtype, k_cache.device)
        bufs = views[key] = (kbuf, vbuf, keys, values, k32, v32)
    kbuf, vbuf, keys, values, k32, v32 = bufs
    # index_select, not tensor[int32_index]: advanced indexing with int32 indices is ~200x slower on CPU.
    torch.index_select(k_cache, 0, blocks, out=kbuf)
    torch.index_select(v_cache, 0, blocks, out=vbuf)
    if k32 is not None:
        k32.copy_(keys)
        v32.copy_(values)
        keys, values = k32, v32
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2).to(dtype), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


_ATTN_NATIVE = bool(os.environ.get("LOCALCHAT_ATTN_NATIVE_DTYPE"))  # experiments: attention in bf16 like transformers


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    # PyTorch's CPU flash attention is ~6x slower in bfloat16 than float32 for decode-sized queries, so on
    # the CPU single-token rows run in float32 (the K/V copy is small).
    if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and not _ATTN_NATIVE:
        return torch.float32
    return query.dtype


# Padding a group of sequences to its longest context costs gathered tokens; each extra group costs a
# dozen more ops per layer. A group's cost is modelled as GROUP_COST_TOKENS + padded tokens, and the
# cheapest split of the length-sorted batch into consecutive groups is chosen (an O(n^2) DP over <= 64 rows).
GROUP_COST_TOKENS = 512


def _split_groups(lens: list[int], block_size: int) -> list[list[int]]:
    n = len(lens)
    if n <= 1 or max(lens) - min(lens) < 2 * block_size:
        return [list(range(n))]
    order = sorted(range(n), key=lens.__getitem__)
    padded = [-(-max(lens[i], 1) // block_size) * block_size for i in order]
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = padded[j - 1]
        for i in range(j):
            cost = best[i] + GROUP_COST_TOKENS + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _decode_plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> list[tuple]:
    """Per group: (row index or None for the whole batch, block ids, blocks, length, mask, buffer views);
    built once per step and shared by every layer."""
    plan = meta.scratch.get("decode")
    if plan is not None:
        return plan
    lens = meta.context_lens_list
    groups = _split_groups(lens, block_size)
    plan = []
    for rows in groups:
        whole = len(groups) == 1
        sel = None if whole else torch.tensor(rows, dtype=torch.long, device=device)
        glens = [lens[r] for r in rows]
        length = max(max(glens), 1)
        num_blocks = -(-length // block_size)
        tables = meta.block_tables if whole else meta.block_tables.index_select(0, sel)
        blocks = tables[:, :num_blocks].reshape(-1).to(torch.long)
        mask = None
        if min(glens) != length:
            ctx = meta.context_lens if whole else meta.context_lens.index_select(0, sel)
            valid = torch.arange(length, device=device)[None, :] < ctx[:, None]
            # A padding sequence (context 0) would mask every key and give NaN; its output is unused.
            valid[:, 0] = True
            mask = valid[:, None, None, :]
        plan.append((sel, blocks, num_blocks, length, mask, {}))
    meta.scratch["decode"] = plan
    return plan


def prompt_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    skip_decode: bool = False,
) -> torch.Tensor:
    """One SDPA call per sequence (prompt chunks); with skip_decode, single-token rows are left unwritten."""
    _, block_size, kv_heads, head_dim = k_cache.shape
    decode_dtype = _compute_dtype(query)
    out = torch.empty_like(query)
    start = 0
    for seq, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list)):
        if q_len == 0:
            continue
        end = start + q_len
        if skip_decode and q_len == 1:
            start = end
            continue
        num_blocks = -(-ctx // block_size)
        table = meta.block_tables[seq, :num_blocks]
        shape = (num_blocks, block_size, kv_heads, head_dim)
        kbuf = torch.index_select(k_cache, 0, table.to(torch.long), out=_buffers.get("k", shape, k_cache.dtype, k_cache.device))
        vbuf = torch.index_select(v_cache, 0, table.to(torch.long), out=_buffers.get("v", shape, v_cache.dtype, v_cache.device))
        keys = kbuf.view(num_blocks * block_size, kv_heads, head_dim)[:ctx].transpose(0, 1)
        values = vbuf.view(num_blocks * block_size, kv_heads, head_dim)[:ctx].transpose(0, 1)
        queries = query[start:end].transpose(0, 1)
        # Prompt chunks run in the model's dtype, as transformers runs them: bfloat16 prefill is then bit-identical
        # to transformers' (tests/test_real_bf16.py), for ~1 s more of prompt attention over the 40 s throughput
        # bench than a float32 copy would take (benchmarks/NOTES.md).
        dtype = query.dtype if q_len > 1 else decode_dtype
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
