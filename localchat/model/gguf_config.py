"""A GGUF file's transformers config, with what transformers' GGUF reader leaves out put back.

transformers maps a GGUF's metadata to a config, but (checked with transformers 5.24 and files written
as llama.cpp's converter writes them, tests/helpers/gguf_files.py):
- Llama 3.x rope scaling is lost: llama.cpp stores no rope parameters but a `rope_freqs` tensor of
  per-frequency divisors, which transformers ignores, so the model would run with plain rope. We read
  it: when it equals a known "llama3" parameter set the config gets those parameters (transformers then
  computes the same frequencies); otherwise the divisors themselves go in `config.rope_freq_factors`,
  which our forward applies (localchat/model/llama.py rope_inv_freq).
- Qwen3's head_dim is not read (its config class then defaults to 128): `{arch}.attention.key_length`
  says what it is.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The Llama 3.x "llama3" rope parameter sets in the wild (3.1: factor 8; 3.2: factor 32).
LLAMA3_ROPE_CANDIDATES = [
    {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for factor in (8.0, 16.0, 32.0)
]


def _metadata(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Scalar metadata and tensor names, without the tokenizer's large arrays."""
    try:  # transformers' own reader is ~100x faster than gguf.GGUFReader on a 150k-token vocabulary
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return read_gguf_metadata(str(path))
    except ImportError:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        values = {k: f.contents() for k, f in reader.fields.items() if len(f.data) == 1}
        return values, tuple(t.name for t in reader.tensors)


def _tensor(path: Path, name: str) -> np.ndarray:
    from gguf import GGUFReader, dequantize

    for tensor in GGUFReader(str(path)).tensors:
        if tensor.name == name:
            return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(-1)
    raise KeyError(name)


def _llama3_parameters(config: Any, factors: np.ndarray) -> dict | None:
    """The known llama3 parameter set that gives exactly these divisors, if any."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = (config.rope_parameters or {}).get("rope_theta", 10000.0)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    for candidate in LLAMA3_ROPE_CANDIDATES:
        trial = copy.deepcopy(config)
        trial.rope_parameters = {"rope_type": "llama3", "rope_theta": theta, **candidate}
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](trial, None)
        if inv_freq.shape == base.shape and torch.allclose(base / inv_freq, torch.tensor(factors), rtol=1e-4):
            return trial.rope_parameters
    return None


def apply_gguf_fixups(config: Any, path: Path) -> Any:
    """Correct `config` (as transformers read it from `path`) in place; returns it."""
    metadata, tensor_names = _metadata(path)
    arch = metadata.get("general.architecture", "")
    key_length = metadata.get(f"{arch}.attention.key_length")
    if key_length and getattr(config, "head_dim", None) != int(key_length):
        config.head_dim = int(key_length)
    if "rope_freqs.weight" in tensor_names:
        factors = _tensor(path, "rope_freqs.weight")
        known = _llama3_parameters(config, factors)
        if known is not None:
            config.rope_parameters = known
        else:
            config.rope_freq_factors = [float(x) for x in factors]
    return config


def gguf_config(directory: Path, gguf_file: str) -> Any:
    """The corrected transformers config of a GGUF file (reads metadata only). A file of an
    architecture we don't run is refused here, before transformers (or a conversion) looks at it."""
    from transformers import AutoConfig

    from localchat.model.architectures import (
        SUPPORTED_MODEL_TYPES,
        UnsupportedModelError,
    )

    path = Path(directory) / gguf_file
    try:
        arch = _metadata(path)[0].get("general.architecture")
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a GGUF we can read"
        raise UnsupportedModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path.name}: model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    return apply_gguf_fixups(config, path)
