"""Tiny random-weight models built from a transformers config (no download), and the reference model."""

from __future__ import annotations

from typing import Any

import torch

from localchat.model.llama import LlamaForCausalLM
from localchat.model.loader import LoadedModel, weights_dir
from localchat.model.registry import resolve_model


def hf_reference_model(loaded_or_name: LoadedModel | str | None = None) -> Any:
    """transformers' own LlamaForCausalLM (float32, CPU) on the same weights, for comparisons."""
    from transformers import AutoModelForCausalLM

    if isinstance(loaded_or_name, LoadedModel):
        directory = loaded_or_name.path
    else:
        directory, _ = weights_dir(resolve_model(loaded_or_name))
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def tiny_llama_config(**overrides: Any) -> Any:
    """A small random-weight Llama config (no download): 2 layers, 4 heads over 2 KV heads, head_dim 16."""
    from transformers import LlamaConfig

    params: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def build_model_from_hf(
    hf_model: Any, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> LlamaForCausalLM:
    """Our model with the weights of a transformers LlamaForCausalLM (same dtype/device unless given)."""
    reference = next(hf_model.parameters())
    model = LlamaForCausalLM(hf_model.config, dtype=dtype or reference.dtype, device=device or reference.device)
    model.load_hf_state_dict(hf_model.state_dict())
    return model.eval()


def loaded_from_hf(hf_model: Any, tokenizer: Any, *, name: str = "tiny", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A LoadedModel (what Engine.from_loaded takes) over a transformers model's weights."""
    model = build_model_from_hf(hf_model, dtype=dtype, device="cpu")
    return LoadedModel(
        name=name, config=hf_model.config, tokenizer=tokenizer, model=model, dtype=dtype, device=torch.device("cpu"),
    )


def default_tokenizer() -> Any:
    """The default model's tokenizer (its converted copy is cached after the first load)."""
    from transformers import AutoTokenizer

    directory, _ = weights_dir(resolve_model(None))
    return AutoTokenizer.from_pretrained(directory)


def tiny_engine(tokenizer: Any = None, *, seed: int = 0, num_blocks: int = 512, block_size: int = 16,
                config_overrides: dict | None = None, **engine_kwargs: Any):
    """An engine over a tiny random-weight Llama with the default tokenizer's vocabulary. A module-level
    function, so an engine process (localchat/engine/process.py) can build the same engine."""
    from transformers import LlamaForCausalLM as HFLlama

    from localchat.engine import Engine, EngineConfig

    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    torch.manual_seed(seed)
    overrides = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    overrides.update(config_overrides or {})
    hf = HFLlama(tiny_llama_config(**overrides)).eval()
    config = EngineConfig(num_blocks=num_blocks, block_size=block_size, **engine_kwargs)
    engine = Engine.from_loaded(loaded_from_hf(hf, tokenizer), config)
    engine.hf_model = hf  # for reference comparisons in tests
    return engine


def failing_factory(message: str):
    raise ValueError(message)
