"""Owns the KV pool tensors and turns one scheduled step into a forward pass."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

import kernels
from localchat.engine.scheduler import ScheduledWork


def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype) -> int:
    """K and V of `block_size` tokens for every layer."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * block_size * kv_heads * head_dim * itemsize


def num_blocks_for_budget(hf_config, block_size: int, dtype: torch.dtype, budget_bytes: float) -> int:
    return max(1, int(budget_bytes // kv_bytes_per_block(hf_config, block_size, dtype)))


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed activation buffers for reuse instead of handing them back to the kernel.

    By default glibc serves allocations above ~128 KiB-32 MiB with fresh mmap pages and trims freed heap
    memory, so every step's activations, logits and attention scratch land on new pages; on these VMs a
    fresh page costs far more than the copy into it (first touch runs at 0.5-1.6 GB/s). Raising the mmap
    threshold to its maximum (32 MiB) and the trim threshold out of reach cut the decode part of the
    throughput bench by ~12% (benchmarks/NOTES.md). The KV pool is above the threshold and unaffected.
    Process-wide and idempotent; a no-op where there is no glibc (returns False).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(mallopt(m_trim_threshold, 1 << 30))


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, hf_config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
        attention: str = "auto",
    ) -> None:
        if torch.device(device).type == "cpu":
            keep_freed_memory()
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = block_size
        # The kernels an engine asked for by name (--attention torch|triton); None: the device's own.
        self.attention = kernels.select_backend(attention, self.device.type)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # torch.zeros touches every page now, so the first steps don't pay for fresh memory.
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(hf_config.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(hf_config.num_hidden_layers)]
        self.kv_caches = list(zip(self.k_caches, self.v_caches))

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_caches + self.v_caches)

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: give each new private block the K/V of the shared block it replaces."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=self.device)
        kernels.copy_blocks(self.k_caches, self.v_caches, src, dst, self.attention)

    @torch.inference_mode()
    def execute(self, work: list[ScheduledWork], copies: list[tuple[int, int]]) -> torch.Tensor:
        """Run one step. Returns float32 logits, one row per work item that completes its
        sequence (in `work` order); chunks in the middle of a prompt need no logits."""
        self.apply_copies(copies)
        input_ids: list[int] = []
        positions: list[int] = []
        tables: list[list[int]] = []
        context_lens: list[int] = []
        query_lens: list[int] = []
        logits_indices: list[int] = []
        for w in work:
            seq, start, n = w.seq, w.start, w.num_new_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            tables.append(w.block_table)
            context_lens.append(start + n)
            query_lens.append(n)
            if w.completes_sequence:
                logits_indices.append(len(input_ids) - 1)
        meta = kernels.build_metadata(tables, context_lens, query_lens, self.block_size, self.device)
        meta.backend = self.attention
        return self.model(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.kv_caches,
            meta,
            torch.tensor(logits_indices, dtype=torch.long, device=self.device),
        )
