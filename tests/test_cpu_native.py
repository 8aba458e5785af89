"""The native CPU decode attention (kernels/cpu_native.py, csrc/paged_decode.cpp) against the dense reference,
and the PyTorch fallback when it can't be built."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import skip_or_fail
from kernels import build_metadata, cpu_native, torch_ops
from test_attention import run_case


@pytest.fixture(autouse=True)
def native_kernel_built():
    if cpu_native.library() is None:
        skip_or_fail("the native kernel could not be built (no C++ compiler? install g++)")


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the sequences the native kernel attended, so each test knows it ran (not the fallback)."""
    calls = []
    real = cpu_native.paged_decode

    def spy(query, k_cache, v_cache, block_tables, context_lens, scale, out, rows=None):
        calls.append(int(context_lens.numel()))
        return real(query, k_cache, v_cache, block_tables, context_lens, scale, out, rows)

    monkeypatch.setattr(cpu_native, "paged_decode", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_matches_dense_reference(dtype, block_size, group, native_calls):
    # Contexts around the 16-token tiles of the AVX-512 path: partial tiles, exact tiles, a long one.
    ctx_lens = [1, 15, 16, 17, 31, 33, 300]
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    run_case(ctx_lens, [1] * len(ctx_lens), block_size, kv_heads=3, group=group, head_dim=64, dtype=dtype, atol=atol)
    assert native_calls == [len(ctx_lens)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_128_and_long_context(dtype, native_calls):
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    run_case([2000, 5], [1, 1], 16, kv_heads=2, group=4, head_dim=128, dtype=dtype, atol=atol, seed=3)
    assert native_calls == [2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_step_decode_rows_go_native(dtype, native_calls):
    # prompt chunk, prefix-hit chunk, three decoding sequences, a single-token prompt
    ctx_lens = [40, 50, 33, 17, 64, 1]
    q_lens = [40, 10, 1, 1, 1, 1]
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    meta = run_case(ctx_lens, q_lens, 16, kv_heads=3, group=3, head_dim=64, dtype=dtype, atol=atol, seed=5)
    assert not meta.is_decode_only
    assert native_calls == [4]  # the four single-token rows, in one call


def test_bfloat16_error_no_worse_than_pytorch_path():
    torch.manual_seed(0)
    block_size, kv_heads, heads, dim = 16, 3, 9, 64
    ctx_lens = [100, 700, 1500]
    tables, at = [], 1
    for c in ctx_lens:
        n = math.ceil(c / block_size)
        tables.append(list(range(at, at + n)))
        at += n
    k_cache = torch.randn(at, block_size, kv_heads, dim).bfloat16()
    v_cache = torch.randn(at, block_size, kv_heads, dim).bfloat16()
    query = (torch.randn(len(ctx_lens), heads, dim) * 3).bfloat16()  # peaked softmax
    meta = build_metadata(tables, ctx_lens, [1] * len(ctx_lens), block_size)
    scale = dim**-0.5
    native = cpu_native.paged_attention(query, k_cache, v_cache, meta, scale).double()
    fallback = torch_ops.paged_attention(query, k_cache, v_cache, meta, scale).double()
    exact = torch_ops.paged_attention(query.double(), k_cache.double(), v_cache.double(), meta, scale)
    native_err = (native - exact).abs().max().item()
    fallback_err = (fallback - exact).abs().max().item()
    assert native_err <= 1.5 * fallback_err + 1e-3, (native_err, fallback_err)


def test_stale_slots_never_leak():
    # Slots past a sequence's context hold whatever an earlier sequence left, NaN included.
    torch.manual_seed(1)
    k_cache = torch.full((4, 16, 3, 64), float("nan")).bfloat16()
    v_cache = torch.full((4, 16, 3, 64), float("nan")).bfloat16()
    k_cache[2, :5] = torch.randn(5, 3, 64).bfloat16()
    v_cache[2, :5] = torch.randn(5, 3, 64).bfloat16()
    meta = build_metadata([[2]], [5], [1], 16)
    query = torch.randn(1, 9, 64).bfloat16()
    out = cpu_native.paged_attention(query, k_cache, v_cache, meta, 0.125)
    expected = torch_ops.paged_attention(query, k_cache[:, :5].contiguous()[[2]], v_cache[:, :5].contiguous()[[2]],
                                         build_metadata([[0]], [5], [1], 5), 0.125)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_unsupported_shapes_use_the_pytorch_path(native_calls):
    run_case([5, 30], [1, 1], 4, kv_heads=2, group=3, head_dim=16)  # head_dim 16: no native kernel
    assert native_calls == []
    run_case([5, 30], [1, 1], 4, kv_heads=2, group=3, head_dim=64, dtype=torch.float16, atol=2e-2)
    assert native_calls == []


def test_without_a_compiler_the_pytorch_path_takes_over(monkeypatch, tmp_path, caplog, native_calls):
    monkeypatch.setattr(cpu_native, "_library", None)
    monkeypatch.setattr(cpu_native, "_tried", False)
    monkeypatch.setattr(cpu_native, "_compiler", lambda: None)
    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_native"):
        assert cpu_native.library() is None
    assert "no C++ compiler" in caplog.text
    run_case([5, 40], [1, 1], 16, kv_heads=3, group=3, head_dim=64, dtype=torch.bfloat16, atol=2e-2)
    assert native_calls == []


def test_disabled_by_environment(monkeypatch, native_calls):
    monkeypatch.setattr(cpu_native, "_library", None)
    monkeypatch.setattr(cpu_native, "_tried", False)  # a fresh process: the setting is read on first use
    monkeypatch.setenv("LOCALCHAT_NATIVE_KERNELS", "0")
    assert cpu_native.library() is None
    run_case([5, 40], [1, 1], 16, kv_heads=3, group=3, head_dim=64, atol=1e-5)
    assert native_calls == []


def test_build_is_cached_by_source(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path))
    compiler = cpu_native._compiler()
    first = cpu_native._build(compiler)
    mtime = first.stat().st_mtime_ns
    assert cpu_native._build(compiler) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary files left behind
