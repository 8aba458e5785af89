"""Paged-attention kernels: one interface, a backend per device type, or the one an engine asks for.

The PyTorch implementation (torch_ops) serves every device; the CPU uses cpu_native (a C++ decode
attention, falling back to torch_ops where it can't be built); CUDA uses triton_ops when triton is
installed. `select_backend` names a backend explicitly ("torch" or "triton", the engine's --attention):
the model runner puts it on each step's AttentionMetadata, and the ops below take it from there.

Never give this package a `__version__`: transformers probes `import kernels` for the Hugging Face hub
package of that name, and a version attribute is one of the things it reads (see tests/test_kernels_package.py).
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import cpu_native, torch_ops
from .metadata import AttentionMetadata, build_metadata

__all__ = [
    "ATTENTION_CHOICES",
    "AttentionMetadata",
    "backend_for",
    "select_backend",
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


ATTENTION_CHOICES = ("auto", "torch", "triton")


def _triton() -> ModuleType:
    """kernels.triton_ops, imported on demand: triton is optional, and on the CPU its kernels only run under
    the interpreter, which must be switched on before @triton.jit runs (at the module's import)."""
    import importlib
    import os
    import sys

    if "kernels.triton_ops" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        module = importlib.import_module("kernels.triton_ops")
    except ImportError as exc:
        raise ValueError(f"--attention triton needs the triton package ({exc}); install it with: pip install triton") from None
    if module.interpreter_enabled() or not torch.cuda.is_available():
        import triton.language.standard as standard

        # triton.language's own @jit helpers (tl.max, tl.sum...) were made when triton was first imported;
        # if that was before the switch above, an interpreted kernel calling them fails mid-run.
        if not module.interpreter_enabled() or type(standard.sum).__name__ != "InterpretedFunction":
            raise ValueError("--attention triton on the CPU needs Triton's interpreter from the start: "
                             "set TRITON_INTERPRET=1 before starting")
        module.use_interpreter_tiles()
    return module


def select_backend(choice: str, device_type: str) -> ModuleType | None:
    """The backend an engine on `device_type` runs for --attention `choice`; None: the device's default."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention backend {choice!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "torch":
        return torch_ops
    if choice == "triton":
        return _triton()
    if device_type == "cuda" and "cuda" not in _BACKENDS:
        try:
            register_backend("cuda", _triton())
        except ValueError:
            return None  # no triton: CUDA runs the PyTorch path
    return None


def backend_for(tensor: torch.Tensor) -> ModuleType:
    """The dispatch point: the backend registered for the tensor's device, else plain PyTorch."""
    return _BACKENDS.get(tensor.device.type, torch_ops)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: ModuleType | None = None,
) -> None:
    (backend or backend_for(k_cache)).write_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    return (meta.backend or backend_for(query)).paged_attention(query, k_cache, v_cache, meta, scale)


def copy_blocks(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    src: torch.Tensor,
    dst: torch.Tensor,
    backend: ModuleType | None = None,
) -> None:
    if not k_caches:
        return
    (backend or backend_for(k_caches[0])).copy_blocks(k_caches, v_caches, src, dst)
