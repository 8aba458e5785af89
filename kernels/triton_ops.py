"""Paged-attention ops as Triton kernels, the backend meant for CUDA: the same interface as kernels/torch_ops.py
(`write_kv`, `paged_attention`, `copy_blocks`) over the same cache layout, [num_blocks, block_size, kv_heads,
head_dim], with every K/V row read through its sequence's block table.

Importing this module needs `triton`; nothing else in kernels/ imports it, so the package works without it.
Call `register()` to route CUDA tensors here (kernels.register_backend).

On the CPU the kernels run under Triton's interpreter: TRITON_INTERPRET=1 must be set *before this module is
imported*, because `@triton.jit` decides when it runs (at import) whether a kernel is compiled for the GPU or
interpreted; `interpreter_enabled()` says which happened. The interpreter is 100-1000x slower than torch: it
is for tests on small shapes (tests/test_triton_kernels.py), not for serving.

Kernels:
- `_write_kv_kernel`: one program per new token stores its K and V rows into its slot (slot -1: skipped).
- `_copy_blocks_kernel`: one launch copies src->dst blocks in every layer's K and V cache (copy-on-write).
- `_decode_kernel` (+ `_reduce_kernel`): one query token per sequence. A program handles one (sequence,
  KV head) pair and all the query heads that share that KV head (GQA), so each K/V row is read once for the
  whole group. With split-K the context is cut into partitions of `partition_size` tokens, one program each,
  which write a partial (max, sum, unnormalized output); the reduction kernel rescales and combines them.
- `_prefill_kernel`: prompt chunks (query_len > 1) over the paged context with a bottom-right causal mask:
  query i of a sequence with q new tokens and context c sits at position c - q + i and sees keys 0..c - q + i.
  A program handles a tile of a sequence's query tokens times the query heads of one KV head.
`paged_attention` sends decode-only batches to the decode kernel; in a mixed batch the chunks go to the
prefill kernel and the single-token rows to the decode kernel.

Numerics: scores, softmax and the output accumulate in float32 for every dtype. On the GPU, float16/bfloat16
matmuls take their inputs in that dtype (the probabilities are rounded to it before P @ V, as flash attention
does); float32 matmuls use full IEEE precision rather than TF32, so float32 matches torch_ops closely. Under
the interpreter everything is converted to float32 after loading: its bfloat16 is raw uint16 bits, and
arithmetic on them gives garbage (a bfloat16 `x * 2` comes back as 0 or 2).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import torch_ops
from .metadata import AttentionMetadata

__all__ = [
    "PARTITION_SIZE",
    "SPLIT_K",
    "copy_blocks",
    "interpreter_enabled",
    "paged_attention",
    "register",
    "use_split_k",
    "write_kv",
]

# Split-K: tokens of context per decode program when the context is split across programs.
PARTITION_SIZE = 512
# Force split-K on (True) or off (False) for every decode call; None leaves it to `use_split_k`.
SPLIT_K: bool | None = None
# A context this long is split even when the batch alone fills the GPU: one sequence's program would
# otherwise run many times longer than the rest of the step.
LONG_CONTEXT = 8192
# Fill the scratch buffers (split-K partials) with NaN before each call, so a partial the reduction reads
# without it having been written shows up in the output. For tests; costs a fill per layer.
POISON_SCRATCH = False

# Tile sizes. DECODE_BLOCK_N: context tokens per loop iteration of a decode program. PREFILL_TILES: per
# compute dtype, (rows, keys): rows are query tokens x the query heads of one KV head per prefill program,
# keys are taken that many per iteration. tl.dot needs every dimension >= 16 on the GPU, hence the padding
# of small GQA groups to 16 rows in decode. float32 gets smaller prefill tiles: its full-precision matmul
# runs on FMAs with the operands in registers, and at 64 x 64 it spilled (ptxas for sm_90, head_dim 64 and
# 128), while 32 x 32 fits; float16/bfloat16 at 64 x 64 use at most 188 registers without spilling.
DECODE_BLOCK_N = 64
PREFILL_TILES = {torch.float16: (64, 64), torch.bfloat16: (64, 64), torch.float32: (32, 32)}
WRITE_TOKENS_PER_PROGRAM = 1

_NEG = tl.constexpr(-1.0e30)  # the running max starts finite, so exp2(m_old - m_new) is never exp2(-inf + inf) = NaN
_LOG2E = 1.4426950408889634


def use_interpreter_tiles() -> None:
    """Tiles for running a whole model under the interpreter (`--attention triton` on the CPU), where each loop
    iteration of a program costs a Python round trip whatever its size: a few large tiles instead of many small
    ones (~10x fewer iterations). Kernel tests keep the GPU tiles, which exercise more tile boundaries."""
    global DECODE_BLOCK_N, PREFILL_TILES, WRITE_TOKENS_PER_PROGRAM
    DECODE_BLOCK_N = 256
    PREFILL_TILES = {dtype: (512, 256) for dtype in PREFILL_TILES}
    WRITE_TOKENS_PER_PROGRAM = 64


def interpreter_enabled() -> bool:
    """Whether this module's kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return type(_write_kv_kernel).__name__ == "InterpretedFunction"


def register() -> None:
    """Route ops on CUDA tensors to these kernels."""
    import sys

    import kernels

    kernels.register_backend("cuda", sys.modules[__name__])


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _upcast(dtype: torch.dtype) -> bool:
    """Whether loaded values are converted to float32 before any arithmetic (see the module docstring)."""
    return dtype == torch.float32 or interpreter_enabled()


# --------------------------------------------------------------------------------------------- write_kv


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    KV_HEADS, HEAD_DIM, NUM_TOKENS,
    BLOCK_SIZE: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr, T_BLK: tl.constexpr,
):
    # T_BLK tokens a program: 1 on the GPU; many under the interpreter, where every program is a Python round trip.
    t = tl.program_id(0).to(tl.int64) * T_BLK + tl.arange(0, T_BLK)
    slot = tl.load(slot_ptr + t, mask=t < NUM_TOKENS, other=-1)
    slot3 = slot[:, None, None]
    keep = slot3 >= 0
    slot3 = tl.where(keep, slot3, 0)
    blk = slot3 // BLOCK_SIZE
    off = slot3 % BLOCK_SIZE
    tok = t[:, None, None]
    h = tl.arange(0, H_PAD)[None, :, None]
    d = tl.arange(0, D_PAD)[None, None, :]
    # A skipped slot (or a token past the end) masks every head: folded into the bound, because the
    # interpreter (triton 3.9) turns a vector & scalar-bool into integers, which tl.store rejects as a mask.
    mask = (h < tl.where(keep, KV_HEADS, 0)) & (d < HEAD_DIM)
    k = tl.load(key_ptr + tok * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d * stride_kcd, k, mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d * stride_vcd, v, mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter this step's K/V ([T, kv_heads, head_dim], any strides) into their slots; slot -1 is skipped."""
    tokens = slot_mapping.numel()
    if tokens == 0:
        return
    _, block_size, kv_heads, head_dim = k_cache.shape
    # A dtype change is done by torch, so the cache holds exactly what torch_ops would store (the interpreter
    # rounds float32 -> bfloat16 its own way).
    if key.dtype != k_cache.dtype:
        key = key.to(k_cache.dtype)
    if value.dtype != v_cache.dtype:
        value = value.to(v_cache.dtype)
    t_blk = WRITE_TOKENS_PER_PROGRAM
    _write_kv_kernel[(triton.cdiv(tokens, t_blk),)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        kv_heads, head_dim, tokens,
        BLOCK_SIZE=block_size, H_PAD=_next_pow2(kv_heads), D_PAD=_next_pow2(head_dim), T_BLK=t_blk,
    )


# ------------------------------------------------------------------------------------------ copy_blocks


@triton.jit
def _copy_blocks_kernel(cache_ptrs, src_ptr, dst_ptr, block_numel, ELEM_BITS: tl.constexpr, CHUNK: tl.constexpr):
    # The caches' base addresses come in as integers, so all layers' K and V caches are one launch; blocks
    # are copied as raw bits, which keeps the kernel independent of the float dtype.
    cache = tl.program_id(0)
    pair = tl.program_id(1)
    chunk = tl.program_id(2)
    addr = tl.load(cache_ptrs + cache)
    if ELEM_BITS == 16:
        base = addr.to(tl.pointer_type(tl.int16))
    elif ELEM_BITS == 32:
        base = addr.to(tl.pointer_type(tl.int32))
    else:
        base = addr.to(tl.pointer_type(tl.int8))
    src = tl.load(src_ptr + pair)
    dst = tl.load(dst_ptr + pair)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    x = tl.load(base + src * block_numel + offs, mask=mask)
    tl.store(base + dst * block_numel + offs, x, mask=mask)


def copy_blocks(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    src: torch.Tensor,
    dst: torch.Tensor,
) -> None:
    """Copy whole blocks src[i] -> dst[i] in every layer (copy-on-write before a forward pass)."""
    if src.numel() == 0 or not k_caches:
        return
    caches = [*k_caches, *v_caches]
    first = caches[0]
    src_list = src.tolist()  # CoW copies at most a block per fork: the sync is negligible, and this check needs it
    dst_list = dst.tolist()
    same_layout = all(c.shape == first.shape and c.dtype == first.dtype and c.is_contiguous() for c in caches)
    if set(src_list) & set(dst_list) or not same_layout or first.element_size() not in (1, 2, 4):
        # A block that is both a source and a destination must contribute its old contents, which parallel
        # programs can't promise; the block manager never asks for that, torch_ops handles it.
        torch_ops.copy_blocks(k_caches, v_caches, src, dst)
        return
    device = first.device
    src = src.to(device=device, dtype=torch.int64)
    dst = dst.to(device=device, dtype=torch.int64)
    ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=device)
    block_numel = first[0].numel()
    chunk = min(4096, _next_pow2(block_numel))
    grid = (len(caches), len(src_list), triton.cdiv(block_numel, chunk))
    _copy_blocks_kernel[grid](ptrs, src, dst, block_numel, ELEM_BITS=first.element_size() * 8, CHUNK=chunk)


# -------------------------------------------------------------------------------------- decode (split-K)


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    block_tables_ptr, context_lens_ptr, seq_ids_ptr, query_start_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    stride_ms, stride_mh,
    stride_as, stride_ah, stride_ap,
    GROUP, HEAD_DIM, PARTITION,
    BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_SEQ_IDS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    if HAS_SEQ_IDS:  # a mixed batch: this program's sequence and its query row are looked up
        seq = tl.load(seq_ids_ptr + pid)
        row = tl.load(query_start_ptr + seq).to(tl.int64)
    else:
        seq = pid
        row = pid.to(tl.int64)
    ctx = tl.load(context_lens_ptr + seq)
    if SPLIT:
        start = part * PARTITION
        end = tl.minimum(start + PARTITION, ctx)
    else:
        start = 0
        end = ctx

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    head = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(
        q_ptr + row * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=gmask[:, None] & dmask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([G_PAD], _NEG, tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        # Each token's physical block: any block size works, and a tile may span several blocks.
        blk = tl.load(table + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = t % BLOCK_SIZE
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(
            k_cache_ptr + (blk * stride_kb + off * stride_ks + kvh * stride_kh)[:, None] + d[None, :] * stride_kd,
            mask=kv_mask, other=0.0,
        ).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain: exp2 below
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + (blk * stride_vb + off * stride_vs + kvh * stride_vh)[:, None] + d[None, :] * stride_vd,
            mask=kv_mask, other=0.0,
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PREC)
        m = m_new

    if SPLIT:
        # Partials per (program, query head, partition); a partition past the context writes nothing and
        # the reduction skips it.
        # (Bound folded as in _write_kv_kernel, for the interpreter.)
        wmask = g < tl.where(start < ctx, GROUP, 0)
        base = pid.to(tl.int64) * stride_ms + head * stride_mh + part
        tl.store(m_ptr + base, m, mask=wmask)
        tl.store(l_ptr + base, l, mask=wmask)
        acc_off = pid.to(tl.int64) * stride_as + head[:, None] * stride_ah + part * stride_ap + d[None, :]
        tl.store(acc_ptr + acc_off, acc, mask=wmask[:, None] & dmask[None, :])
    else:
        # A context of 0 (a padding row) has nothing to attend: its output is 0 rather than 0/0.
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(
            out_ptr + row * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :],
        )


@triton.jit
def _reduce_kernel(
    out_ptr, m_ptr, l_ptr, acc_ptr, context_lens_ptr, seq_ids_ptr, query_start_ptr,
    stride_ot, stride_oh, stride_od,
    stride_ms, stride_mh,
    stride_as, stride_ah, stride_ap,
    HEAD_DIM, PARTITION,
    P_PAD: tl.constexpr, D_PAD: tl.constexpr, HAS_SEQ_IDS: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + pid)
        row = tl.load(query_start_ptr + seq).to(tl.int64)
    else:
        seq = pid
        row = pid.to(tl.int64)
    ctx = tl.load(context_lens_ptr + seq)
    parts = tl.cdiv(ctx, PARTITION)
    p = tl.arange(0, P_PAD)
    d = tl.arange(0, D_PAD)
    pmask = p < parts
    dmask = d < HEAD_DIM
    base = pid.to(tl.int64) * stride_ms + head * stride_mh + p
    m = tl.load(m_ptr + base, mask=pmask, other=_NEG)
    l = tl.load(l_ptr + base, mask=pmask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(pmask, tl.math.exp2(m - m_max), 0.0)
    total = tl.sum(w * l, 0)
    acc = tl.load(
        acc_ptr + pid.to(tl.int64) * stride_as + head * stride_ah + p[:, None] * stride_ap + d[None, :],
        mask=pmask[:, None] & dmask[None, :], other=0.0,
    )
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=dmask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def use_split_k(num_seqs: int, kv_heads: int, max_context_len: int, device: torch.device | str,
                partition_size: int | None = None) -> bool:
    """The split-K heuristic (SPLIT_K, when set, overrides it).

    Without splitting, a decode step runs one program per (sequence, KV head), each streaming its whole
    context. That is enough when those programs fill the GPU (>= 2 per SM) and no context is very long; a
    context longer than one partition is split when they don't (few sequences: most SMs would idle) or when
    it reaches LONG_CONTEXT tokens (it would keep its SM busy long after the others finish).
    """
    if SPLIT_K is not None:
        return SPLIT_K
    partition = partition_size or PARTITION_SIZE
    if max_context_len <= partition:
        return False
    device = torch.device(device)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 1
    return num_seqs * kv_heads < 2 * sms or max_context_len >= LONG_CONTEXT


def _scratch(meta: AttentionMetadata, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Float32 scratch reused by every layer of the step (same shapes each layer; one stream orders them)."""
    store = meta.scratch.setdefault("triton_buffers", {})
    key = (name, shape, device)
    buf = store.get(key)
    if buf is None:
        buf = store[key] = torch.empty(shape, dtype=torch.float32, device=device)
    if POISON_SCRATCH:
        buf.fill_(float("nan"))
    return buf


def _decode(query, k_cache, v_cache, meta, scale, out, seq_ids, num_seqs, max_ctx, split_k, partition_size):
    _, block_size, kv_heads, head_dim = k_cache.shape
    heads = query.shape[1]
    group = heads // kv_heads
    partition = partition_size or PARTITION_SIZE
    split = use_split_k(num_seqs, kv_heads, max_ctx, query.device, partition) if split_k is None else split_k
    upcast = _upcast(query.dtype)
    g_pad = max(16, _next_pow2(group))
    d_pad = _next_pow2(head_dim)
    block_n = DECODE_BLOCK_N if not split else max(16, min(DECODE_BLOCK_N, _next_pow2(partition)))
    parts = max(1, triton.cdiv(max_ctx, partition)) if split else 1
    if split:
        m = _scratch(meta, "m", (num_seqs, heads, parts), query.device)
        l = _scratch(meta, "l", (num_seqs, heads, parts), query.device)
        acc = _scratch(meta, "acc", (num_seqs, heads, parts, head_dim), query.device)
    else:
        m = l = acc = out  # unused: the kernel writes `out` directly
    has_ids = seq_ids is not None
    ids = seq_ids if has_ids else meta.context_lens  # a placeholder pointer when unused
    _decode_kernel[(num_seqs, kv_heads, parts)](
        query, k_cache, v_cache, out, m, l, acc,
        meta.block_tables, meta.context_lens, ids, meta.query_start_loc,
        scale * _LOG2E,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        meta.block_tables.stride(0),
        m.stride(0) if split else 0, m.stride(1) if split else 0,
        acc.stride(0) if split else 0, acc.stride(1) if split else 0, acc.stride(2) if split else 0,
        group, head_dim, partition,
        BLOCK_SIZE=block_size, G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n,
        SPLIT=split, HAS_SEQ_IDS=has_ids, UPCAST=upcast, DOT_PREC="ieee" if upcast else None,
    )
    if split:
        _reduce_kernel[(num_seqs, heads)](
            out, m, l, acc, meta.context_lens, ids, meta.query_start_loc,
            *out.stride(), m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
            head_dim, partition,
            P_PAD=max(2, _next_pow2(parts)), D_PAD=d_pad, HAS_SEQ_IDS=has_ids,
        )


# ------------------------------------------------------------------------------------- prefill / chunks


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, context_lens_ptr, query_start_ptr, tile_seq_ptr, tile_q0_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    GROUP, HEAD_DIM,
    BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // G_PAD
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)

    # Row r of the tile is query token q0 + r // G_PAD of the sequence, for query head r % G_PAD of the group.
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // G_PAD
    g = r % G_PAD
    head = kvh * GROUP + g
    rmask = (qi < q_len) & (g < GROUP)
    pos = ctx - q_len + qi  # each row's position in its sequence: it sees keys 0..pos
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    row = (q_start + qi).to(tl.int64)
    q = tl.load(
        q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=rmask[:, None] & dmask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_M], _NEG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Keys past the tile's last query token are masked for every row: stop there.
    kv_end = tl.minimum(ctx, ctx - q_len + q0 + BLOCK_Q)
    for t0 in range(0, kv_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < kv_end
        blk = tl.load(table + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = t % BLOCK_SIZE
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(
            k_cache_ptr + (blk * stride_kb + off * stride_ks + kvh * stride_kh)[:, None] + d[None, :] * stride_kd,
            mask=kv_mask, other=0.0,
        ).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(tmask[None, :] & (t[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + (blk * stride_vb + off * stride_vs + kvh * stride_vh)[:, None] + d[None, :] * stride_vd,
            mask=kv_mask, other=0.0,
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PREC)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(
        out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :],
    )


def _plan(meta: AttentionMetadata, block_q: int, device: torch.device) -> dict:
    """Per step (shared by every layer): the prefill tiles (sequence, first query token) of the chunks, and
    the sequences with a single new token, which go to the decode kernel."""
    plans = meta.scratch.setdefault("triton_plan", {})
    plan = plans.get(block_q)
    if plan is not None:
        return plan
    tile_seq, tile_q0, decode_seqs = [], [], []
    for seq, q_len in enumerate(meta.query_lens):
        if q_len == 1:
            decode_seqs.append(seq)
        elif q_len > 1:
            for q0 in range(0, q_len, block_q):
                tile_seq.append(seq)
                tile_q0.append(q0)
    plan = {
        "tiles": len(tile_seq),
        "tile_seq": torch.tensor(tile_seq, dtype=torch.int32, device=device),
        "tile_q0": torch.tensor(tile_q0, dtype=torch.int32, device=device),
        "decode_seqs": torch.tensor(decode_seqs, dtype=torch.int32, device=device),
        "decode_max_ctx": max((meta.context_lens_list[s] for s in decode_seqs), default=0),
    }
    plans[block_q] = plan
    return plan


def _prefill(query, k_cache, v_cache, meta, scale, out, plan, block_m, block_n):
    _, block_size, kv_heads, head_dim = k_cache.shape
    group = query.shape[1] // kv_heads
    g_pad = _next_pow2(group)
    upcast = _upcast(query.dtype)
    _prefill_kernel[(plan["tiles"], kv_heads)](
        query, k_cache, v_cache, out,
        meta.block_tables, meta.context_lens, meta.query_start_loc, plan["tile_seq"], plan["tile_q0"],
        scale * _LOG2E,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        meta.block_tables.stride(0),
        group, head_dim,
        BLOCK_SIZE=block_size, G_PAD=g_pad, D_PAD=_next_pow2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=upcast, DOT_PREC="ieee" if upcast else None,
    )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    split_k: bool | None = None,
    partition_size: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's new queries ([T, heads, head_dim], any strides) over its paged context.

    The K/V of this step's tokens must already be written (write_kv). Query i of a sequence with q new
    tokens and context c sits at position c - q + i and sees keys 0..c - q + i (bottom-right causal).
    `out` ([T, heads, head_dim]) receives the result if given; `split_k` forces split-K decode on or off
    (default: SPLIT_K, else `use_split_k`) and `partition_size` sets its tokens per partition.
    """
    tokens, heads, head_dim = query.shape
    kv_heads = k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads can't be grouped over {kv_heads} KV heads")
    if out is None:
        out = torch.empty((tokens, heads, head_dim), dtype=query.dtype, device=query.device)
    if tokens == 0:
        return out
    if meta.is_decode_only:
        _decode(query, k_cache, v_cache, meta, scale, out, None, meta.num_seqs, meta.max_context_len,
                split_k, partition_size)
        return out
    g_pad = _next_pow2(heads // kv_heads)
    block_m, block_n = PREFILL_TILES.get(query.dtype, PREFILL_TILES[torch.float32])
    block_m = max(block_m, g_pad)
    plan = _plan(meta, block_m // g_pad, query.device)
    if plan["tiles"]:
        _prefill(query, k_cache, v_cache, meta, scale, out, plan, block_m, block_n)
    seqs = plan["decode_seqs"]
    if seqs.numel():
        _decode(query, k_cache, v_cache, meta, scale, out, seqs, seqs.numel(), plan["decode_max_ctx"],
                split_k, partition_size)
    return out
