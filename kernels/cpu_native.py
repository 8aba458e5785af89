"""The CPU's native decode attention (csrc/paged_decode.cpp), compiled on first use and called via ctypes.

PyTorch has no paged attention for the CPU, and assembling one from torch ops means gathering every
sequence's blocks, converting them to float32 and running SDPA per (sequence, head): at a batch of 64 that
was most of a decode step. The C++ kernel reads each K/V row once from the pool instead.

It needs a C++ compiler with OpenMP (g++ or clang++); the build (kernels/native_build.py) takes about a
second and is cached under ~/.cache/localchat/kernels, keyed by the source, the compiler and the CPU. Without a
compiler, or with LOCALCHAT_NATIVE_KERNELS=0, `library()` is None and torch_ops keeps its PyTorch path, which
computes the same thing.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from . import native_build, torch_ops
from .metadata import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = native_build.CSRC / "paged_decode.cpp"
FLAGS = list(native_build.FLAGS)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_HEAD_DIMS = (64, 128)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False

# The build machinery lives in native_build (shared with the quantized matmul); these names stay so callers
# and tests that reach for them (e.g. to take the compiler away) keep working.
enabled = native_build.enabled
_cpu_signature = native_build.cpu_signature
_cache_dir = native_build.cache_dir


def _compiler() -> str | None:
    return native_build.find_compiler()


def _build(compiler: str):
    return native_build.build(SOURCE, "paged_decode", compiler, FLAGS)


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.localchat_paged_decode
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.c_float, ctypes.c_int,
    ]


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it the first time; None if it can't be had."""
    global _library, _tried
    if _tried:  # every layer of every step asks: answer from the first decision, without the environment
        return _library
    with _lock:
        if _tried:
            return _library
        # `_compiler` is looked up through this module at call time so a test can replace it.
        _library = native_build.load_library(
            SOURCE, "paged_decode", setup=_declare, flags=FLAGS, compiler=lambda: _compiler(),
            logger=log, what="native CPU attention",
        )
        _tried = True
        return _library


def supports(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors (CPU, float32/bfloat16, head_dim 64/128, dense rows)."""
    return (
        query.device.type == "cpu"
        and query.dtype == k_cache.dtype == v_cache.dtype
        and k_cache.shape == v_cache.shape
        and v_cache.is_contiguous()
        and query.dtype in _DTYPE_CODES
        and k_cache.shape[-1] in _HEAD_DIMS
        and query.shape[-1] == k_cache.shape[-1]
        and query.stride(-1) == 1
        and query.stride(-2) == query.shape[-1]
        and k_cache.is_contiguous()
        and library() is not None
    )


def paged_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    """out[rows[s]] = attention of query[rows[s]] ([heads, head_dim]) over sequence s's context.

    block_tables is int32 [S, max_blocks] with unit column stride, context_lens int32 [S], rows int64 [S]
    (None: row s is sequence s). Every tensor must stay alive for the call; the caller checked `supports`.
    """
    lib = library()
    assert lib is not None
    heads, head_dim = query.shape[-2], query.shape[-1]
    num_seqs = context_lens.shape[0]
    if block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    status = lib.localchat_paged_decode(
        _DTYPE_CODES[query.dtype],
        query.data_ptr(), query.stride(0),
        k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0),
        context_lens.data_ptr(),
        rows.data_ptr() if rows is not None else None,
        num_seqs,
        out.data_ptr(), out.stride(0),
        heads, k_cache.shape[2], head_dim, k_cache.shape[1], scale,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"native decode attention does not support heads={heads}, kv_heads={k_cache.shape[2]}, head_dim={head_dim}")


# The CPU backend (registered for "cpu" in kernels/__init__): decode rows go to the native kernel when it
# is available; prompt chunks, block writes and copies stay with torch_ops.
write_kv = torch_ops.write_kv
copy_blocks = torch_ops.copy_blocks


def paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    if not supports(query, k_cache, v_cache):
        return torch_ops.paged_attention(query, k_cache, v_cache, meta, scale)
    if meta.is_decode_only:
        out = torch.empty(query.shape, dtype=query.dtype)
        paged_decode(query, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, out)
        return out
    split = torch_ops.mixed_decode_split(meta)
    out = torch_ops.prompt_attention(query, k_cache, v_cache, meta, scale, skip_decode=split is not None)
    if split is not None:
        decode_meta, rows = split
        paged_decode(query, k_cache, v_cache, decode_meta.block_tables, decode_meta.context_lens, scale, out, rows)
    return out
