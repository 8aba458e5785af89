"""The CPU's native decode attention (csrc/paged_decode.cpp), compiled on first use and called via ctypes.

PyTorch has no paged attention for the CPU, and assembling one from torch ops means gathering every
sequence's blocks, converting them to float32 and running SDPA per (sequence, head): at a batch of 64 that
was most of a decode step. The C++ kernel reads each K/V row once from the pool instead.

It needs a C++ compiler with OpenMP (g++ or clang++); the build takes about a second and is cached under
~/.cache/localchat/kernels, keyed by the source, the compiler and the CPU. Without a compiler, or with
LOCALCHAT_NATIVE_KERNELS=0, `available()` is False and torch_ops keeps its PyTorch path, which computes the
same thing.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from . import torch_ops
from .metadata import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_HEAD_DIMS = (64, 128)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """LOCALCHAT_NATIVE_KERNELS=0 keeps the PyTorch path; read once, when the kernel is first asked for."""
    return os.environ.get("LOCALCHAT_NATIVE_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    # -march=native code must not be loaded on a different CPU (a home directory shared between machines).
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("LOCALCHAT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "localchat")
    return Path(root) / "kernels"


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"paged_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: another process building at the same time can't see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it the first time; None if it can't be had."""
    global _library, _tried
    if _tried:  # every layer of every step asks: answer from the first decision, without the environment
        return _library
    with _lock:
        if _tried:
            return _library
        if not enabled():
            _tried = True
            return None
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
            lib = ctypes.CDLL(str(_build(compiler)))
            fn = lib.localchat_paged_decode
            fn.restype = ctypes.c_int
            fn.argtypes = [
                ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                ctypes.c_int, ctypes.c_float, ctypes.c_int,
            ]
            _library = lib
        except Exception as exc:  # any failure leaves the PyTorch path in charge
            log.warning("native CPU attention unavailable, using the PyTorch path: %s", exc)
            _library = None
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
