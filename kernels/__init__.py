"""Paged-attention kernels: one interface, a backend per device type.

The PyTorch implementation (torch_ops) serves every device; the CPU uses cpu_native (a C++ decode
attention, falling back to torch_ops where it can't be built); a faster backend (Triton on CUDA, a later
issue) registers itself for its device type with register_backend and gets picked by the tensors' device.

Never give this package a `__version__`: transformers probes `import kernels` for the Hugging Face hub
package of that name, and a version attribute is one of the things it reads (see tests/test_kernels_package.py).
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import cpu_native, torch_ops
from .metadata import AttentionMetadata, build_metadata

__all__ = [
    "AttentionMetadata",
    "backend_for",
    "build_metadata",
    "copy_blocks",
    "paged_attention",
    "register_backend",
    "write_kv",
]

# device type ("cpu", "cuda", ...) -> module exposing write_kv, paged_attention and copy_blocks
_BACKENDS: dict[str, ModuleType] = {"cpu": cpu_native}


def register_backend(device_type: str, module: ModuleType) -> None:
    """Route ops on tensors of `device_type` to `module` (same signatures as torch_ops)."""
    _BACKENDS[device_type] = module


def backend_for(tensor: torch.Tensor) -> ModuleType:
    """The dispatch point: the backend registered for the tensor's device, else plain PyTorch."""
    return _BACKENDS.get(tensor.device.type, torch_ops)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    backend_for(k_cache).write_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    return backend_for(query).paged_attention(query, k_cache, v_cache, meta, scale)


def copy_blocks(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    src: torch.Tensor,
    dst: torch.Tensor,
) -> None:
    if not k_caches:
        return
    backend_for(k_caches[0]).copy_blocks(k_caches, v_caches, src, dst)
