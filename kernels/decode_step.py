"""Every layer of a Llama-family forward for a few tokens in one native call (csrc/decode_step.cpp).

A StepPlan is built once per model and KV pool: it holds the C descriptions of each layer's weights (their
GGUF blocks, see kernels/quant.py), norms, optional biases and per-head norms, and K/V caches, and keeps the
tensors they point into alive. `run` then takes the step's residual stream and its per-token metadata.
`available()` is False without a compiler (or with LOCALCHAT_NATIVE_KERNELS=0); callers then run the layers
with torch ops.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from . import native_build
from .quant import QuantizedWeight, _QWeight, activation_bits

SOURCE = native_build.CSRC / "decode_step.cpp"
_ERRORS = {-1: "a weight type the kernels don't have", -2: "a weight whose shape doesn't fit its type",
           -3: "a weight with the wrong number of rows", -4: "a missing norm or cache", -5: "inconsistent sizes"}

# What the library is built with; tests swap in quant.AVX2_FLAGS and quant.PORTABLE_FLAGS (the step's attention
# and matmuls have a path for each). Each set of flags is a separate cached build, loaded once per process.
BUILD_FLAGS: tuple[str, ...] = tuple(native_build.FLAGS)

_lock = threading.Lock()
_libraries: dict[tuple[str, ...], ctypes.CDLL | None] = {}


class _Layer(ctypes.Structure):  # LayerDesc in csrc/decode_step.cpp
    _fields_ = [(name, _QWeight) for name in ("q", "k", "v", "o", "gate", "up", "down")] + [
        (name, ctypes.c_void_p) for name in ("attn_norm", "ffn_norm", "qkv_bias", "q_norm", "k_norm", "k_cache", "v_cache")
    ]


class _Step(ctypes.Structure):  # StepDesc in csrc/decode_step.cpp
    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "inter")],
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("layers", ctypes.c_void_p), ("T", ctypes.c_int64), ("x", ctypes.c_void_p),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("kv_bf16", ctypes.c_int64), ("block_size", ctypes.c_int64),
        ("slots", ctypes.c_void_p), ("block_tables", ctypes.c_void_p), ("table_stride", ctypes.c_int64),
        ("token_table", ctypes.c_void_p), ("token_ctx", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p), ("num_threads", ctypes.c_int64), ("activation_bits", ctypes.c_int64),
        ("final_norm", ctypes.c_void_p), ("positions", ctypes.c_void_p), ("inv_freq", ctypes.c_void_p),
        ("rope_scaling", ctypes.c_float),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    lib.localchat_decode_step.restype = ctypes.c_int
    lib.localchat_decode_step.argtypes = [ctypes.POINTER(_Step)]
    lib.localchat_step_scratch_floats.restype = ctypes.c_int64
    lib.localchat_step_scratch_floats.argtypes = [ctypes.c_int64] * 8


def library() -> ctypes.CDLL | None:
    key = BUILD_FLAGS
    if key in _libraries:  # every step asks: answer from the first decision
        return _libraries[key]
    with _lock:
        if key not in _libraries:
            _libraries[key] = native_build.load_library(SOURCE, "decode_step", setup=_declare, flags=key,
                                                        what="the native decode step")
    return _libraries[key]


def available() -> bool:
    return library() is not None


@dataclass
class LayerTensors:
    """One layer for the plan: quantized projections, float32 norms/biases, and its K/V caches."""

    q: QuantizedWeight
    k: QuantizedWeight
    v: QuantizedWeight
    o: QuantizedWeight
    gate: QuantizedWeight
    up: QuantizedWeight
    down: QuantizedWeight
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


class StepPlan:
    def __init__(self, layers: list[LayerTensors], *, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 inter: int, eps: float, scale: float) -> None:
        caches = {(l.k_cache.dtype, tuple(l.k_cache.shape)) for l in layers} | {(l.v_cache.dtype, tuple(l.v_cache.shape)) for l in layers}
        if len(caches) != 1 or next(iter(caches))[0] not in (torch.float32, torch.bfloat16):
            raise ValueError("the native step needs float32 or bfloat16 caches of one shape")
        dtype, shape = next(iter(caches))
        if shape[1:] != (shape[1], kv_heads, head_dim):
            raise ValueError(f"cache shape {shape} does not hold {kv_heads} KV heads of {head_dim}")
        self.dims = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, inter=inter)
        self.eps, self.scale = eps, scale
        self.kv_bf16 = int(dtype == torch.bfloat16)
        self.block_size = shape[1]
        self._keep: list = []  # every tensor a description points into
        self._layers = (_Layer * len(layers))(*(self._describe(l) for l in layers))
        self._scratch = torch.empty(0)

    def _describe(self, l: LayerTensors) -> _Layer:
        floats = [_f32(t) for t in (l.attn_norm, l.ffn_norm, l.qkv_bias, l.q_norm, l.k_norm)]
        self._keep += [l, *floats]
        weights = [w._desc(0) for w in (l.q, l.k, l.v, l.o, l.gate, l.up, l.down)]
        return _Layer(*weights, *(_ptr(t) for t in floats), l.k_cache.data_ptr(), l.v_cache.data_ptr())

    def run(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, slots: torch.Tensor,
            block_tables: torch.Tensor, token_table: torch.Tensor, token_ctx: torch.Tensor, activations: str = "float32",
            *, rope: tuple[torch.Tensor, torch.Tensor, float] | None = None, final_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer for x [T, hidden] float32 (updated in place and returned); cos/sin float32 [T, head_dim/2],
        or None with `rope` (positions int64 [T], inv_freq float32 [head_dim/2], scaling): the step computes them;
        slots int64 [T]; block_tables int32 [S, width]; token_table, token_ctx int32 [T]. activations: as
        quant.matmul's. final_norm: float32 [hidden], the model's last norm, applied to x before it returns."""
        if (cos is None) != (rope is not None) or (cos is None) != (sin is None):
            raise ValueError("the native step needs either cos and sin, or rope's positions and frequencies")
        lib = library()
        if lib is None:
            raise RuntimeError("the native decode step is not available")
        d = self.dims
        T = x.shape[0]
        threads = torch.get_num_threads()
        need = lib.localchat_step_scratch_floats(T, d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], d["inter"],
                                                 len(self._layers), threads)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        step = _Step(len(self._layers), d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], d["inter"],
                     self.eps, self.scale, ctypes.addressof(self._layers), T, x.data_ptr(), _ptr(cos), _ptr(sin),
                     self.kv_bf16, self.block_size, slots.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
                     token_table.data_ptr(), token_ctx.data_ptr(), self._scratch.data_ptr(), threads, activation_bits(activations),
                     _ptr(final_norm), *((rope[0].data_ptr(), rope[1].data_ptr(), rope[2]) if rope else (None, None, 1.0)))
        status = lib.localchat_decode_step(ctypes.byref(step))
        if status:
            raise ValueError(f"native decode step: {_ERRORS.get(status, status)}")
        return x
