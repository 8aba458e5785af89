"""Tiny random-weight models of every architecture we run, built from a transformers config (no download).

Each config turns on what sets its architecture apart, at a scale where it changes the outputs:
Llama with "llama3" rope scaling (at the tiny model's scale) and a separate LM head;
Qwen2 with Q/K/V biases; Qwen3 with q/k norms, an explicit head_dim and a tied head; Mistral with a
sliding window no shorter than the context (so it never masks anything, as check_context requires).
transformers initializes biases to 0 and norm weights to 1, which would test nothing: `randomize`
draws them too.
"""

from __future__ import annotations

from typing import Any

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
CONTEXT = 512


def tiny_config(arch: str, vocab_size: int, **overrides: Any):
    """A 2-layer config of `arch` with `vocab_size` tokens (4 query heads over 2 KV heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        # "llama3" scaled to the tiny model: at head_dim 16, with a 64-token original context, one
        # frequency is kept, one smoothed and six divided, so the scaling moves the outputs.
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        config = LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False, head_dim=16)
    elif arch == "qwen2":
        config = Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                             tie_word_embeddings=False, use_sliding_window=False)
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                             tie_word_embeddings=True, use_sliding_window=False, attention_bias=False)
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=CONTEXT, tie_word_embeddings=False,
                               rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw every parameter: biases and norm weights too, which transformers' init leaves at 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
        elif name.endswith(".bias"):
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    return model


def tiny_hf_model(arch: str, vocab_size: int, seed: int = 0, **overrides: Any):
    """transformers' own float32 model of `arch`, randomized (the reference)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if config.tie_word_embeddings:
        model.tie_weights()
    return randomize(model, seed)


def save_tiny_model(hf_model: Any, tokenizer: Any, directory) -> None:
    """A model directory in transformers format (what a Hub repository holds)."""
    hf_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def reference_greedy(hf_model: Any, prompt: list[int], max_new: int) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                            pad_token_id=0)
    return out[0, len(prompt):].tolist()
