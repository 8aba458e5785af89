"""Will the model fit? The memory its weights and KV pool will take, against what this machine has free.

Checked before any weight is loaded (localchat/cli/common.py build_engine, and the app before it swaps
models), so a model too large for the machine is refused with a message instead of the process being
killed by the kernel half way through loading. Figures are estimates from the config's shapes:
weights = parameters x bytes per element of the dtype we run; the KV pool is what the engine will
allocate; a GGUF converted for the first time also holds its float32 expansion while converting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from localchat.model.architectures import parameter_count

GIB = 2**30
RUNTIME_BYTES = 512 * 2**20  # torch, tokenizer, activations and the page's process: measured ~0.4-0.5 GiB here


class InsufficientMemoryError(ValueError):
    """The model (weights + KV pool) would not fit in the memory that is free."""


@dataclass
class MemoryEstimate:
    model: str
    device: str
    parameters: int
    weights_bytes: int
    kv_cache_bytes: int  # 0 when the engine sizes the pool from what is left (CUDA default)
    conversion_bytes: int  # peak of a first GGUF conversion (float32 model in memory), else 0
    available_bytes: int | None  # None when it cannot be told
    dtype: str = ""
    # Activations beyond those of the default batch limits (RUNTIME_BYTES covers those), and what
    # they grow by per batched token and per sampled row (localchat/model/memory.py activation_costs).
    activation_bytes: int = 0
    batch: "BatchCosts | None" = None
    config: Any = field(default=None, repr=False)  # the model's config the estimate was made from

    @property
    def needed_bytes(self) -> int:
        running = self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + RUNTIME_BYTES
        return max(running, self.conversion_bytes + RUNTIME_BYTES)

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def describe(self) -> str:
        parts = [f"weights {self.weights_bytes / GIB:.2f} GiB"]
        if self.kv_cache_bytes:
            parts.append(f"KV cache {self.kv_cache_bytes / GIB:.2f} GiB")
        if self.activation_bytes:
            parts.append(f"activations {self.activation_bytes / GIB:.2f} GiB")
        parts.append(f"runtime {RUNTIME_BYTES / GIB:.2f} GiB")
        text = f"{self.model} needs ~{self.needed_bytes / GIB:.2f} GiB on {self.device} ({', '.join(parts)}"
        if self.conversion_bytes:
            text += f"; converting its GGUF the first time peaks at {self.conversion_bytes / GIB:.2f} GiB"
        return text + ")"

    def check(self) -> None:
        if self.fits:
            return
        free = f"{self.available_bytes / GIB:.2f} GiB" if self.available_bytes is not None else "?"
        fits = self.largest_values()
        if fits:
            hint = "the largest value that fits: " + " or ".join(f"{flag} {value}" for flag, value in fits.items())
        else:
            hint = "use a smaller model or a smaller --kv-cache-gb"
        if self.dtype == "float32":
            hint += ", or --dtype bfloat16 (half the weights' memory)"
        raise InsufficientMemoryError(f"not enough memory: {self.describe()}, but only {free} is free; {hint}")

    def largest_values(self) -> dict[str, str]:
        """For each size the user sets that alone could make this fit, the largest value that would
        (--kv-cache-gb, --max-num-batched-tokens, --max-num-seqs), most memory first."""
        if self.available_bytes is None or self.conversion_bytes + RUNTIME_BYTES > self.available_bytes:
            return {}
        room = self.available_bytes - self.weights_bytes - RUNTIME_BYTES  # for the KV pool and extra activations
        found: list[tuple[int, str, str]] = []
        if self.kv_cache_bytes and room - self.activation_bytes >= 2**20:
            largest = (room - self.activation_bytes) / GIB
            found.append((self.kv_cache_bytes, "--kv-cache-gb", f"{int(largest * 100) / 100:g}"))
        b = self.batch
        if b is not None and self.activation_bytes:
            left = room - self.kv_cache_bytes + b.baseline  # what all activations may take
            tokens = (left - b.per_row * b.num_seqs) // b.per_token
            if 1 <= tokens < b.batched_tokens:
                found.append((self.activation_bytes, "--max-num-batched-tokens", str(tokens)))
            seqs = (left - b.per_token * b.batched_tokens) // b.per_row
            if 1 <= seqs < b.num_seqs:
                found.append((self.activation_bytes, "--max-num-seqs", str(seqs)))
        found.sort(key=lambda f: -f[0])
        return {flag: value for _, flag, value in found}


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What a container's memory limit still allows (cgroup v2), if there is a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_memory(device: str | torch.device) -> int | None:
    """Free memory for a new model: RAM (and the container's limit) on the CPU, free memory on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(values) if values else None


@dataclass
class BatchCosts:
    """What a step's activations take (float32 scratch): per batched token (hidden states, q/k/v, the MLP,
    a prefill chunk's attention scores over the whole context) and per sampled row (logits, their
    probabilities and sort); `baseline` is what the default batch limits take."""

    per_token: int
    per_row: int
    batched_tokens: int
    num_seqs: int
    baseline: int

    @property
    def bytes(self) -> int:
        return self.per_token * self.batched_tokens + self.per_row * self.num_seqs


def activation_costs(config: Any, context: int, batched_tokens: int, num_seqs: int) -> BatchCosts:
    from localchat import settings

    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 4 * (6 * hidden + 3 * inter + (heads + 2 * kv_heads) * head_dim + heads * context)
    per_row = 4 * 3 * config.vocab_size
    baseline = per_token * settings.DEFAULT_MAX_NUM_BATCHED_TOKENS + per_row * settings.DEFAULT_MAX_NUM_SEQS
    return BatchCosts(per_token, per_row, int(batched_tokens), int(num_seqs), baseline)


def estimate(config: Any, dtype: torch.dtype, device: str | torch.device, kv_cache_bytes: int | None,
             *, converting: bool = False, name: str = "the model", available: int | None = None,
             extra_weight_bytes: int = 0, batch: BatchCosts | None = None) -> MemoryEstimate:
    """What loading `config` in `dtype` on `device` with a KV pool of `kv_cache_bytes` will take
    (`extra_weight_bytes`: weights held besides the dense ones, e.g. a GGUF's quantized blocks; `batch`:
    the step's activations under the engine's batch limits)."""
    params = parameter_count(config)
    element = torch.empty((), dtype=dtype).element_size()
    device = torch.device(device)
    return MemoryEstimate(
        model=name,
        device=str(device),
        parameters=params,
        weights_bytes=params * element + int(extra_weight_bytes),
        kv_cache_bytes=int(kv_cache_bytes or 0),
        conversion_bytes=int(params * 4 * 1.2) if converting and device.type == "cpu" else 0,
        available_bytes=available_memory(device) if available is None else available,
        dtype=str(dtype).removeprefix("torch."),
        activation_bytes=max(0, batch.bytes - batch.baseline) if batch is not None else 0,
        batch=batch,
        config=config,
    )


def context_problem(requested: int | None, model_context: int, pool_tokens: int | None) -> str | None:
    """Why a context (--max-model-len) the user asked for cannot be, naming the largest that can; None if it can."""
    if requested is None:
        return None
    if requested > model_context:
        return f"--max-model-len {requested} is longer than the model's context: the largest is {model_context}"
    if pool_tokens is not None and requested > pool_tokens:
        return (f"--max-model-len {requested}: the KV cache holds only {pool_tokens} tokens, so the largest context "
                f"that fits is {pool_tokens} (or raise --kv-cache-gb)")
    return None


def swap_order(wanted: MemoryEstimate, held: MemoryEstimate | None) -> str:
    """Replacing a running model (`held`) by `wanted`: "alongside" when the new one fits in what is free
    now, "replace" when it fits only once the running one is released; raises InsufficientMemoryError
    (saying what would be free) when it fits neither way."""
    if wanted.fits:
        return "alongside"
    if held is None or wanted.available_bytes is None:
        wanted.check()
    released = dataclasses.replace(wanted, available_bytes=wanted.available_bytes + held.needed_bytes)
    released.check()  # raises, counting the running model's memory as free
    return "replace"


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def gguf_file_bytes(spec: Any) -> int:
    """Size of a model's GGUF file (its quantized blocks stay in memory when they run), 0 if unknown."""
    from localchat.model.files import source_dir

    if not spec.gguf_file:
        return 0
    try:
        return (source_dir(spec) / spec.gguf_file).stat().st_size
    except (OSError, ValueError):
        return 0
