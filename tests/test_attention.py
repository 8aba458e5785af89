"""Paged attention, write_kv and copy_blocks against a dense reference over contiguous K/V."""

from __future__ import annotations

import math
import random

import pytest
import torch

import kernels
from kernels import build_metadata
from kernels import torch_ops


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention for one sequence: q [q, H, D] are the last q positions of k, v [c, KVH, D]."""
    q_len, heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


def random_tables(rng: random.Random, ctx_lens: list[int], block_size: int, num_blocks: int) -> list[list[int]]:
    """Distinct shuffled physical blocks per sequence (never block 0, so table padding with 0 is harmless)."""
    needed = [math.ceil(c / block_size) for c in ctx_lens]
    pool = list(range(1, num_blocks))
    rng.shuffle(pool)
    tables, at = [], 0
    for n in needed:
        tables.append(pool[at : at + n])
        at += n
    assert at <= len(pool)
    return tables


def run_case(ctx_lens, q_lens, block_size, kv_heads, group, head_dim=16, seed=0, dtype=torch.float32, atol=1e-5):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    heads = kv_heads * group
    num_blocks = sum(math.ceil(c / block_size) for c in ctx_lens) + 4
    tables = random_tables(rng, ctx_lens, block_size, num_blocks)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    full_k = [torch.randn(c, kv_heads, head_dim).to(dtype) for c in ctx_lens]
    full_v = [torch.randn(c, kv_heads, head_dim).to(dtype) for c in ctx_lens]

    # The cached prefix is already in the pool; this step's tokens come through write_kv.
    prefix_k = torch.cat([k[: c - q] for k, c, q in zip(full_k, ctx_lens, q_lens)])
    prefix_v = torch.cat([v[: c - q] for v, c, q in zip(full_v, ctx_lens, q_lens)])
    slots = []
    for table, c, q in zip(tables, ctx_lens, q_lens):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c - q)]
    kernels.write_kv(prefix_k, prefix_v, k_cache, v_cache, torch.tensor(slots, dtype=torch.long))

    meta = build_metadata(tables, ctx_lens, q_lens, block_size)
    new_k = torch.cat([k[c - q :] for k, c, q in zip(full_k, ctx_lens, q_lens)])
    new_v = torch.cat([v[c - q :] for v, c, q in zip(full_v, ctx_lens, q_lens)])
    kernels.write_kv(new_k, new_v, k_cache, v_cache, meta.slot_mapping)

    query = torch.randn(sum(q_lens), heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = kernels.paged_attention(query, k_cache, v_cache, meta, scale)
    assert out.shape == query.shape and out.dtype == dtype

    start = 0
    for k, v, c, q in zip(full_k, full_v, ctx_lens, q_lens):
        expected = dense_attention(query[start : start + q], k, v, scale)
        torch.testing.assert_close(out[start : start + q], expected, atol=atol, rtol=atol)
        start += q
    return meta


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("group", [1, 3])
def test_mixed_batch(block_size, group):
    # prefill, prefix-hit prefill (query shorter than context), decode, single-token prefill, chunk
    ctx_lens = [7, 20, 33, 1, 40]
    q_lens = [7, 5, 1, 1, 16]
    meta = run_case(ctx_lens, q_lens, block_size, kv_heads=2, group=group)
    assert not meta.is_decode_only


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_only_batch(block_size, group):
    ctx_lens = [1, 5, 17, 48, 16, 33]
    meta = run_case(ctx_lens, [1] * len(ctx_lens), block_size, kv_heads=3, group=group, seed=1)
    assert meta.is_decode_only


@pytest.mark.parametrize("decode_only", [False, True])
def test_bfloat16(decode_only):
    ctx_lens = [9, 30, 17]
    q_lens = [1, 1, 1] if decode_only else [9, 4, 1]
    run_case(ctx_lens, q_lens, 4, kv_heads=2, group=3, seed=7, dtype=torch.bfloat16, atol=2e-2)


@pytest.mark.parametrize("seed", range(5))
def test_random_batches(seed):
    rng = random.Random(100 + seed)
    block_size = rng.choice([1, 3, 16])
    ctx_lens = [rng.randint(1, 60) for _ in range(rng.randint(1, 6))]
    q_lens = [rng.choice([1, c, rng.randint(1, c)]) for c in ctx_lens]
    run_case(ctx_lens, q_lens, block_size, kv_heads=rng.choice([1, 2]), group=rng.choice([1, 3]), seed=seed)


def test_decode_path_matches_per_sequence_path():
    torch.manual_seed(0)
    ctx_lens = [3, 9, 30]
    tables = [[1], [2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    meta = build_metadata(tables, ctx_lens, [1, 1, 1], block_size=3)
    k_cache = torch.randn(16, 3, 2, 8)
    v_cache = torch.randn(16, 3, 2, 8)
    query = torch.randn(3, 6, 8)
    fast = torch_ops._decode(query, k_cache, v_cache, meta, 0.3)
    slow = torch_ops.prompt_attention(query, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)


def test_decode_with_padding_sequence_is_finite():
    meta = build_metadata([[1], [0]], [4, 0], [1, 0], block_size=4)
    # A padded decode slot: the runner gives it query length 1 and context 0 with slot -1.
    meta.query_lens = [1, 1]
    meta.slot_mapping = torch.tensor([7, -1])
    k_cache = torch.randn(3, 4, 1, 8)
    v_cache = torch.randn(3, 4, 1, 8)
    before = k_cache.clone()
    kernels.write_kv(torch.ones(2, 1, 8), torch.ones(2, 1, 8), k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache.view(-1, 1, 8)[7], torch.ones(1, 8))
    changed = (k_cache != before).flatten(1).any(-1)
    assert changed.nonzero().flatten().tolist() == [1]  # only block 1 (slot 7) was written
    out = kernels.paged_attention(torch.randn(2, 2, 8), k_cache, v_cache, meta, 0.5)
    assert torch.isfinite(out).all()


def test_write_kv_scatters_to_slots():
    k_cache = torch.zeros(4, 3, 2, 5)
    v_cache = torch.zeros(4, 3, 2, 5)
    key = torch.randn(3, 2, 5)
    value = torch.randn(3, 2, 5)
    kernels.write_kv(key, value, k_cache, v_cache, torch.tensor([11, 0, 4]))
    assert torch.equal(k_cache[3, 2], key[0]) and torch.equal(v_cache[3, 2], value[0])
    assert torch.equal(k_cache[0, 0], key[1]) and torch.equal(v_cache[0, 0], value[1])
    assert torch.equal(k_cache[1, 1], key[2]) and torch.equal(v_cache[1, 1], value[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3


def test_write_kv_casts_to_cache_dtype():
    k_cache = torch.zeros(2, 2, 1, 4, dtype=torch.bfloat16)
    v_cache = torch.zeros(2, 2, 1, 4, dtype=torch.bfloat16)
    kernels.write_kv(torch.ones(1, 1, 4), torch.ones(1, 1, 4), k_cache, v_cache, torch.tensor([3]))
    assert k_cache[1, 1].float().sum() == 4


def test_copy_blocks_every_layer():
    torch.manual_seed(0)
    k_caches = [torch.randn(6, 4, 2, 3) for _ in range(3)]
    v_caches = [torch.randn(6, 4, 2, 3) for _ in range(3)]
    k_before = [k.clone() for k in k_caches]
    v_before = [v.clone() for v in v_caches]
    # block 2 is both a destination and (for block 5) a source: sources are read before any write.
    kernels.copy_blocks(k_caches, v_caches, torch.tensor([1, 2]), torch.tensor([2, 5]))
    for k, v, k0, v0 in zip(k_caches, v_caches, k_before, v_before):
        assert torch.equal(k[2], k0[1]) and torch.equal(v[2], v0[1])
        assert torch.equal(k[5], k0[2]) and torch.equal(v[5], v0[2])
        for untouched in (0, 1, 3, 4):
            assert torch.equal(k[untouched], k0[untouched]) and torch.equal(v[untouched], v0[untouched])


def test_copy_blocks_empty_is_noop():
    k = [torch.randn(2, 2, 1, 2)]
    v = [torch.randn(2, 2, 1, 2)]
    before = k[0].clone()
    kernels.copy_blocks(k, v, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert torch.equal(k[0], before)


def test_build_metadata_fields():
    meta = build_metadata([[4, 2], [7]], [5, 2], [2, 1], block_size=3)
    # seq 0 writes positions 3, 4 -> block 2 offsets 0, 1; seq 1 writes position 1 -> block 7 offset 1
    assert meta.slot_mapping.tolist() == [6, 7, 22]
    assert meta.block_tables.tolist() == [[4, 2], [7, 0]]
    assert meta.block_tables.dtype == torch.int32
    assert meta.query_start_loc.tolist() == [0, 2, 3]
    assert meta.context_lens.tolist() == [5, 2]
    assert (meta.max_query_len, meta.max_context_len, meta.num_tokens) == (2, 5, 3)
    assert not meta.is_decode_only


def test_dispatch_point_routes_by_device():
    calls = []

    class Fake:
        @staticmethod
        def write_kv(*args):
            calls.append("write_kv")

    kernels.register_backend("meta", Fake)
    try:
        t = torch.empty(1, 1, 1, 1, device="meta")
        kernels.write_kv(t, t, t, t, torch.empty(1, dtype=torch.long, device="meta"))
        assert calls == ["write_kv"]
        assert kernels.backend_for(torch.empty(1)) is kernels.cpu_native  # the CPU's own backend
    finally:
        kernels._BACKENDS.pop("meta")
