"""Which architectures our forward pass (localchat/model/llama.py) runs, and what sets each apart.

All four are the Llama block (RMSNorm -> attention with rotary positions -> RMSNorm -> SwiGLU MLP);
they differ in a few switches, read here from the transformers config and nowhere else:

| model_type | Q/K/V bias           | output bias       | per-head q/k RMSNorm | notes                        |
| llama      | attention_bias       | attention_bias    | no                   | rope "llama3" (Llama 3.x)    |
| mistral    | no                   | no                | no                   | sliding_window (v0.1)        |
| qwen2      | always               | no                | no                   | sliding layers if enabled    |
| qwen3      | attention_bias       | attention_bias    | yes, before rope     | head_dim is set explicitly   |

Anything else (another model_type, a rope type we don't implement, sliding-window attention that
would cut into the context we run) is refused with UnsupportedModelError naming what is missing,
so a model never runs with the wrong math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

# Rope types whose frequencies are fixed per model (so replies never depend on the batch); "dynamic"
# only while the context stays within the length it was trained for (checked in check_rope).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """A model this forward does not run (another architecture, or a variant it refuses on purpose).

    A ValueError, so the CLI and the UI report it as bad input instead of crashing."""


@dataclass(frozen=True)
class Architecture:
    """What the forward pass must do differently for one model (plain flags, mirrored by native code)."""

    model_type: str
    qkv_bias: bool  # a bias on the fused Q/K/V projection
    o_bias: bool  # a bias on the attention output projection
    mlp_bias: bool  # biases on gate/up and down
    qk_norm: bool  # RMSNorm over head_dim of every q and k head, after the projection and before rope
    head_dim: int
    rms_norm_eps: float

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def architecture(config: Any) -> Architecture:
    """The switches for config's model_type (raises UnsupportedModelError for any other type)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    attention_bias = bool(getattr(config, "attention_bias", False))
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False  # transformers' Qwen2Attention: bias on q/k/v only, whatever the config says
    elif model_type == "mistral":
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = attention_bias
    return Architecture(
        model_type=model_type,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        head_dim=head_dim(config),
        rms_norm_eps=float(config.rms_norm_eps),
    )


def context_length(config: Any, requested: int | None = None) -> int:
    """The context we run: what the caller asks for, else the model's max_position_embeddings."""
    return int(requested or getattr(config, "max_position_embeddings", 2048))


def sliding_window_layers(config: Any) -> tuple[int | None, list[int]]:
    """(window, layers that use it); (None, []) when every layer attends to the whole context."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if unknown:
            raise UnsupportedModelError(f"{config.model_type}: attention layer types {unknown} are not supported")
    if not window:
        return None, []
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return None, []
    if types is None:  # Mistral: every layer
        return int(window), list(range(config.num_hidden_layers))
    return int(window), [i for i, t in enumerate(types) if t == "sliding_attention"]


def check_context(config: Any, context: int | None = None) -> None:
    """Refuse a sliding window that would matter: a token at distance >= window would be masked by the
    model but seen by our full attention. With context <= window no token is ever that far."""
    window, layers = sliding_window_layers(config)
    context = context_length(config, context)
    if window is not None and layers and window < context:
        raise UnsupportedModelError(
            f"{config.model_type}: sliding-window attention (window {window} tokens on {len(layers)} of "
            f"{config.num_hidden_layers} layers) is not implemented, and the context of {context} tokens is longer "
            f"than the window; run it with a context of at most {window} tokens (context_length: {window} in "
            "its models.yaml entry)"
        )


def check_rope(config: Any, context: int | None = None) -> str:
    """The rope type, if our forward runs it exactly as transformers does for every position we use."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    if partial != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    if rope_type == "longrope":
        raise UnsupportedModelError(
            "rope_type 'longrope' is not supported: it switches frequency tables with the batch's length, "
            "so a reply would depend on what else is being generated"
        )
    if rope_type == "dynamic":
        limit = int(params.get("original_max_position_embeddings") or config.max_position_embeddings)
        if context_length(config, context) > limit:
            raise UnsupportedModelError(
                f"rope_type 'dynamic' rescales beyond {limit} tokens per batch, which is not implemented; "
                f"run it with a context of at most {limit} tokens"
            )
    elif rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unknown rope_type {rope_type!r} (implemented: {', '.join(STATIC_ROPE_TYPES)}, 'dynamic')"
        )
    return rope_type


def check_supported(config: Any, context: int | None = None) -> Architecture:
    """Everything we refuse, checked before any weight is loaded; the architecture's switches otherwise."""
    arch = architecture(config)
    if config.num_attention_heads % config.num_key_value_heads:
        raise UnsupportedModelError(
            f"{config.num_attention_heads} attention heads do not divide into {config.num_key_value_heads} KV heads"
        )
    check_rope(config, context)
    check_context(config, context)
    return arch


def describe(config: Any) -> str:
    """A short label for listings: family plus what sets the checkpoint apart."""
    arch = architecture(config)
    extras = []
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        extras.append(f"rope {rope_type}")
    if getattr(config, "rope_freq_factors", None):
        extras.append("rope factors")
    if arch.qkv_bias:
        extras.append("qkv bias")
    if arch.qk_norm:
        extras.append("q/k norm")
    if getattr(config, "tie_word_embeddings", False):
        extras.append("tied head")
    return arch.family + (f" ({', '.join(extras)})" if extras else "")


def parameter_count(config: Any) -> int:
    """Parameters of a config of ours, counted from its shapes (no weights needed)."""
    arch = architecture(config)
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * arch.head_dim
    kv = config.num_key_value_heads * arch.head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
    per_layer += (q + 2 * kv) * arch.qkv_bias + hidden * arch.o_bias + (2 * inter + hidden) * arch.mlp_bias
    per_layer += 2 * arch.head_dim * arch.qk_norm
    embed = config.vocab_size * hidden
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    return layers * per_layer + embed + head + hidden


__all__ = [
    "Architecture",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "architecture",
    "check_context",
    "check_rope",
    "check_supported",
    "describe",
    "head_dim",
    "parameter_count",
    "sliding_window_layers",
]
