"""GGUF weights kept in their quantized blocks, multiplied natively on the CPU (csrc/quant_matmul.cpp).

A decode step streams every weight once, so its time is the weight bytes over memory bandwidth. The default
model's Q4_1 file expanded to bfloat16 is 269 MB a token; its blocks as stored are ~96 MB. `matmul` reads the
blocks directly (float32 activations, float32 output), `matmul_multi` does several weights that share an
input (Q/K/V, gate/up: separate GGUF tensors, possibly of different types) in one parallel region, and
`QuantizedWeight.dequantize` expands a weight for the prompt chunks, where a dense GEMM is faster.

The library is built on first use (kernels/native_build.py). Without a compiler, or with
LOCALCHAT_NATIVE_KERNELS=0, `available()` is False: callers should then run dequantized weights; `matmul`
and `dequantize` still work here, through the gguf package's numpy code (slowly), so results never depend
on whether the library exists.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import native_build

log = logging.getLogger(__name__)

SOURCE = native_build.CSRC / "quant_matmul.cpp"
# What the library is built with. Tests swap in AVX2_FLAGS (what a CPU with AVX2 but not AVX-512 runs) and
# PORTABLE_FLAGS (the C++ fallback for a CPU with neither); each set of flags is a separate cached build,
# loaded once per process.
BUILD_FLAGS: tuple[str, ...] = tuple(native_build.FLAGS)
AVX2_FLAGS: tuple[str, ...] = (*native_build.FLAGS, "-mno-avx512f")
PORTABLE_FLAGS: tuple[str, ...] = (*native_build.FLAGS, "-mno-avx512f", "-mno-avx2", "-mno-fma")

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)

_lock = threading.Lock()
_libraries: dict[tuple[str, ...], ctypes.CDLL | None] = {}


class _QWeight(ctypes.Structure):  # localchat_qweight in csrc/quant_matmul.cpp
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("qtype", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("row_bytes", ctypes.c_int64),
        ("out_col", ctypes.c_int64),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    lib.localchat_quant_matmul.restype = ctypes.c_int
    lib.localchat_quant_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
    ]
    lib.localchat_quant_dequantize.restype = ctypes.c_int
    lib.localchat_quant_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    lib.localchat_quant_block.restype = ctypes.c_int
    lib.localchat_quant_block.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    lib.localchat_quant_isa.restype = ctypes.c_int
    lib.localchat_quant_isa.argtypes = []
    # The library's block table must agree with gguf's; a mismatch would silently misread weights.
    qk, size = ctypes.c_int(), ctypes.c_int()
    for qtype in SUPPORTED_TYPES:
        if lib.localchat_quant_block(int(qtype), ctypes.byref(qk), ctypes.byref(size)) != 0:
            raise RuntimeError(f"library lacks {qtype.name}")
        if (qk.value, size.value) != GGML_QUANT_SIZES[qtype]:
            raise RuntimeError(f"{qtype.name}: library block {(qk.value, size.value)} != gguf {GGML_QUANT_SIZES[qtype]}")


def library() -> ctypes.CDLL | None:
    """The loaded library (built the first time with BUILD_FLAGS), or None."""
    key = BUILD_FLAGS
    if key in _libraries:  # every matmul asks: answer from the first decision, without the environment
        return _libraries[key]
    with _lock:
        if key not in _libraries:
            _libraries[key] = native_build.load_library(
                SOURCE, "quant_matmul", setup=_declare, flags=key, logger=log, what="native quantized matmul"
            )
        return _libraries[key]


def available() -> bool:
    """Whether the native kernels can run here; if not, use dequantized weights instead of this module."""
    return library() is not None


def _row_bytes(qtype: int, cols: int) -> int:
    qk, size = GGML_QUANT_SIZES[Q(qtype)]
    if cols % qk:
        raise ValueError(f"{Q(qtype).name} rows need a multiple of {qk} columns, got {cols}")
    return cols // qk * size


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A [rows, cols] weight (rows = output features) as ggml blocks: row r is data[r], a run of blocks along cols.

    `qtype` is a gguf.GGMLQuantizationType value. The tensor must stay as given (uint8, contiguous rows): the
    kernels read it in place.
    """

    data: torch.Tensor
    qtype: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.qtype not in SUPPORTED_TYPES:
            name = Q(self.qtype).name if self.qtype in Q._value2member_map_ else str(self.qtype)
            raise ValueError(f"unsupported weight type {name}; supported: {[t.name for t in SUPPORTED_TYPES]}")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"weight shape must be positive, got {self.rows} x {self.cols}")
        need = (self.rows, _row_bytes(self.qtype, self.cols))
        d = self.data
        if not isinstance(d, torch.Tensor) or d.dtype != torch.uint8 or d.device.type != "cpu":
            raise ValueError("QuantizedWeight.data must be a uint8 CPU tensor")
        if tuple(d.shape) != need or d.stride(1) != 1 or (self.rows > 1 and d.stride(0) < need[1]):
            raise ValueError(
                f"{Q(self.qtype).name} {self.rows} x {self.cols} needs data of shape {need} with contiguous, "
                f"non-overlapping rows; got shape {tuple(d.shape)}, strides {d.stride()}"
            )

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.type_name}, {self.rows} x {self.cols}, {self.nbytes} bytes)"

    @classmethod
    def from_gguf(cls, tensor) -> QuantizedWeight:
        """From a gguf.GGUFReader tensor. GGUF lists dimensions innermost first: gguf shape [in, out] is a
        weight of `out` rows by `in` columns (a 1-D tensor is one row); the bytes are copied out of the file."""
        qtype = int(tensor.tensor_type)
        dims = [int(n) for n in tensor.shape]
        cols = dims[0]
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(rows, -1)
        return cls(torch.from_numpy(raw.copy()), qtype, rows, cols)

    @property
    def type_name(self) -> str:
        return Q(self.qtype).name

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def select_rows(self, index: torch.Tensor | Sequence[int]) -> QuantizedWeight:
        """The weight made of rows `index` (any order, repeats allowed): blocks never straddle rows, so a row
        permutation (e.g. undoing llama.cpp's Q/K rope permutation) is a permutation of the stored rows."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if index.numel() == 0:
            raise ValueError("select_rows needs at least one row")
        if int(index.min()) < -self.rows or int(index.max()) >= self.rows:
            raise ValueError(f"row index out of range for {self.rows} rows")
        data = self.data.index_select(0, index % self.rows)
        return QuantizedWeight(data, self.qtype, int(index.numel()), self.cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense [rows, cols] float32 or bfloat16 tensor (bfloat16 rounded to nearest even)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dequantize to float32 or bfloat16, not {dtype}")
        lib = library()
        if lib is None:
            values = _gguf_dequantize(self.data.numpy(), self.qtype).reshape(self.rows, self.cols)
            return torch.from_numpy(values).to(dtype)
        out = torch.empty(self.rows, self.cols, dtype=dtype)
        desc = self._desc(0)
        # A few rows (a step's embedding lookup) cost less than waking the other threads.
        threads = torch.get_num_threads() if self.rows * self.cols >= 1 << 16 else 1
        status = lib.localchat_quant_dequantize(ctypes.byref(desc), out.data_ptr(), int(dtype == torch.bfloat16), self.cols, threads)
        _check_status(status)
        return out

    def dequantize_rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Float32 rows `ids` as a [len(ids), cols] tensor: a step's embedding lookup, one native call per row
        on the stored blocks (select_rows().dequantize() costs ~0.25 ms of small torch ops a step)."""
        lib = library()
        if lib is None:
            return self.select_rows(list(ids)).dequantize(torch.float32)
        if not ids or min(ids) < 0 or max(ids) >= self.rows:
            raise ValueError(f"row ids must be in [0, {self.rows}), got {list(ids)[:8]}")
        out = torch.empty(len(ids), self.cols, dtype=torch.float32)
        stride, base, dst = self.data.stride(0), self.data.data_ptr(), out.data_ptr()
        for i, row in enumerate(ids):
            desc = _QWeight(base + row * stride, self.qtype, 1, self.cols, stride, 0)
            _check_status(lib.localchat_quant_dequantize(ctypes.byref(desc), dst + 4 * i * self.cols, 0, self.cols, 1))
        return out

    def _desc(self, out_col: int) -> _QWeight:
        return _QWeight(self.data.data_ptr(), self.qtype, self.rows, self.cols, self.data.stride(0), out_col)


def _gguf_dequantize(raw: np.ndarray, qtype: int) -> np.ndarray:
    from gguf.quants import dequantize

    if qtype == Q.BF16:  # gguf's dequantize wants BF16 as bytes, F16/F32 as their own dtypes
        return dequantize(raw, Q.BF16)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == Q.F32:
        return raw.view(np.float32).copy()
    return dequantize(raw, Q(qtype))


def _check_status(status: int) -> None:
    if status != 0:  # the Python checks should have caught every case; this is a disagreement with the library
        raise ValueError(f"native quantized kernel rejected its arguments (status {status})")


class _Group:
    """Weights that share an input, with the library's descriptor array for them built once."""

    __slots__ = ("weights", "descs", "cols", "width")

    def __init__(self, weights: tuple[QuantizedWeight, ...]) -> None:
        if not weights or not all(isinstance(w, QuantizedWeight) for w in weights):
            raise ValueError("matmul_multi needs a non-empty list of QuantizedWeight")
        if len(weights) > 64:
            raise ValueError("at most 64 weights per call")
        cols = weights[0].cols
        if any(w.cols != cols for w in weights):
            raise ValueError(f"all weights must have the same column count, got {[w.cols for w in weights]}")
        self.weights, self.cols = weights, cols
        self.descs = (_QWeight * len(weights))()
        col = 0
        for i, w in enumerate(weights):
            self.descs[i] = w._desc(col)
            col += w.rows
        self.width = col


# A decode step makes ~120 of these calls, each worth tens of microseconds, so the per-call Python is kept to
# a few lookups: groups are cached by the weights' ids. The cache holds the weights themselves, so an id
# can't be reused by a new object while its entry exists; it is emptied when it grows past _GROUPS_MAX.
_groups: dict[tuple[int, ...], _Group] = {}
_GROUPS_MAX = 1024


def _group(weights: Sequence[QuantizedWeight]) -> _Group:
    if not isinstance(weights, (list, tuple)):
        weights = tuple(weights)
    key = tuple(map(id, weights))
    group = _groups.get(key)
    if group is None:
        group = _Group(tuple(weights))
        if len(_groups) >= _GROUPS_MAX:
            _groups.clear()
        _groups[key] = group
    return group


def _bad_x(x: torch.Tensor, cols: int) -> ValueError:
    if not isinstance(x, torch.Tensor) or not x.is_cpu or x.dtype is not torch.float32:
        return ValueError("x must be a float32 CPU tensor")
    return ValueError(f"x must be [T, {cols}] or [{cols}], got {tuple(x.shape)}")


def _bad_out(out: torch.Tensor, tokens: int, width: int) -> ValueError:
    if not isinstance(out, torch.Tensor) or not out.is_cpu or out.dtype is not torch.float32:
        return ValueError("out must be a float32 CPU tensor")
    return ValueError(f"out must be [{tokens}, {width}] (or [{width}] for a 1-D x) with unit column stride, got {tuple(out.shape)}")


# What the quantized matmuls' inputs are rounded to, per block of 32 values with one scale, where the weight's
# type has integer-activation kernels in the build (integer_types(); csrc/integer_activations.h says why), as
# the C calls' activation_bits. float32 uses x as it is.
ACTIVATION_BITS = {"float32": 0, "int16": 16, "int8": 8}


def matmul(x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor | None = None, *, activations: str = "float32") -> torch.Tensor:
    """y = x @ w^T: x float32 [T, cols] (or [cols]), y float32 [T, rows] (or [rows]), written into `out` if given."""
    return matmul_multi(x, (w,), out, activations=activations)


def matmul_multi(x: torch.Tensor, weights: Sequence[QuantizedWeight], out: torch.Tensor | None = None, *,
                 activations: str = "float32") -> torch.Tensor:
    """torch.cat([x @ w^T for w in weights], -1), in one parallel region and without the concatenation.

    All weights must have x's column count; their types may differ. x is float32 [T, cols] or [cols]; `out`
    (optional) float32 [T, sum of rows] with unit column stride (its rows may be strided, e.g. a column slice
    of a wider buffer), or [sum of rows] for a 1-D x. Each output element is summed in the same order whatever
    T or the thread count: results are bitwise batch-invariant.

    activations: a key of ACTIVATION_BITS. "int16" or "int8": the weights whose type has integer-activation
    kernels here (integer_types()) multiply x with each block of 32 values rounded to that many bits; the
    others, and the fallback without the library, use x as it is.
    """
    bits = activation_bits(activations)
    group = _group(weights)
    cols, width = group.cols, group.width
    if not isinstance(x, torch.Tensor) or x.dtype is not torch.float32 or not x.is_cpu:
        raise _bad_x(x, cols)
    # shape and strides read once as tuples: each tensor attribute call costs ~0.1-0.2 us here
    shape, strides = x.shape, x.stride()
    flat = len(shape) == 1
    if flat:
        shape, strides = (1, shape[0]), (shape[0] * strides[0], strides[0])
    if len(shape) != 2 or shape[1] != cols:
        raise _bad_x(x, cols)
    tokens = shape[0]
    x2 = x
    if strides[1] != 1 or (tokens > 1 and strides[0] < cols):
        x2 = x.contiguous()
        strides = (cols, 1)
    if out is None:
        y = torch.empty(tokens, width, dtype=torch.float32)
        y_stride = width
    else:
        if not isinstance(out, torch.Tensor) or out.dtype is not torch.float32 or not out.is_cpu:
            raise _bad_out(out, tokens, width)
        y_shape, y_strides = out.shape, out.stride()
        if flat and len(y_shape) == 1:
            y_shape, y_strides = (1, y_shape[0]), (y_shape[0], y_strides[0])
        if y_shape != (tokens, width) or y_strides[1] != 1 or (tokens > 1 and y_strides[0] < width):
            raise _bad_out(out, tokens, width)
        y, y_stride = out, y_strides[0]
    lib = _libraries.get(BUILD_FLAGS) or library()
    if lib is None:
        _matmul_fallback(x2.view(tokens, cols), group.weights, y.view(tokens, width))
    else:
        status = lib.localchat_quant_matmul(
            x2.data_ptr(), tokens, strides[0], cols, group.descs, len(group.descs), y.data_ptr(), y_stride,
            torch.get_num_threads(), bits,
        )
        if status:
            _check_status(status)
    if out is not None:
        return out
    return y.view(width) if flat else y


def _matmul_fallback(x: torch.Tensor, weights: Sequence[QuantizedWeight], y: torch.Tensor) -> None:
    col = 0
    for w in weights:
        y[:, col : col + w.rows].copy_(x @ w.dequantize(torch.float32).T)
        col += w.rows


def activation_bits(activations: str) -> int:
    """ACTIVATION_BITS[activations], or a ValueError naming the choices."""
    try:
        return ACTIVATION_BITS[activations]
    except (KeyError, TypeError):
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_BITS)}, got {activations!r}") from None


def integer_types(lib: ctypes.CDLL | None = None) -> frozenset[int]:
    """The block types with integer-activation kernels (8 and 16 bits) in `lib` (this module's library by
    default; none outside the AVX2 build)."""
    lib = lib or library()
    if lib is None:
        return frozenset()
    lib.localchat_quant_has_integer.restype = ctypes.c_int
    lib.localchat_quant_has_integer.argtypes = [ctypes.c_int]
    return frozenset(int(q) for q in SUPPORTED_TYPES if lib.localchat_quant_has_integer(int(q)))


def isa() -> str:
    """'avx512', 'avx2' or 'portable': which kernels the loaded library runs ('none' if it isn't available)."""
    lib = library()
    if lib is None:
        return "none"
    return {1: "avx512", 2: "avx2"}.get(lib.localchat_quant_isa(), "portable")
