"""Our forward pass for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3) over a paged KV pool.

What sets each architecture apart (Q/K/V bias, per-head q/k norm, rope scaling) is read from the config by
localchat/model/architectures.py and lives here as plain parameters of the layer: `qkv_proj.bias`,
`o_proj.bias`, `q_norm.weight`/`k_norm.weight`, so anything else that runs these weights sees them too.

transformers supplies config and weights; everything here runs on a flattened token batch (no padding):
the model runner concatenates every scheduled sequence's new tokens and describes them with
AttentionMetadata. Q/K/V and gate/up are fused into single matmuls because on the CPU each extra
small matmul costs more in dispatch and weight traffic than it computes.
"""

from __future__ import annotations

import functools
import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import kernels
from kernels import AttentionMetadata
from localchat import settings
from localchat.model.architectures import (
    SUPPORTED_MODEL_TYPES,
    Architecture,
    UnsupportedModelError,
    check_context,
    check_rope,
    check_supported,
)


def rope_inv_freq(config: PretrainedConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for config.rope_parameters, via transformers' own tables.

    "dynamic" uses its base frequencies, which is exactly what transformers does up to
    max_position_embeddings; beyond it transformers rescales per batch, which would make outputs depend on
    batching, so we don't follow it there. "longrope" switches tables per batch too and is refused
    (localchat/model/architectures.py check_rope says what is refused and why).

    `config.rope_freq_factors` (set by the GGUF conversion in localchat/model/loader.py, from the
    `rope_freqs` tensor llama.cpp stores for Llama 3.x instead of the rope parameters) divides the base
    frequencies one by one, as llama.cpp does.
    """
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = check_rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    if inv_freq.numel() * 2 != head_dim:
        raise UnsupportedModelError(f"rope_type {rope_type!r} gives {inv_freq.numel()} frequencies for head_dim {head_dim}")
    factors = getattr(config, "rope_freq_factors", None)
    if factors:
        if len(factors) != inv_freq.numel():
            raise UnsupportedModelError(f"rope_freq_factors has {len(factors)} values for {inv_freq.numel()} frequencies")
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float)
    return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers (normalize in float32, cast, then scale) so float32
        # logits agree to rounding and bfloat16 behaves like the reference.
        # F.rms_norm is one fused op; it normalizes bfloat16 input in float32 and rounds once, so it is
        # bit-identical to float() -> 5-op norm -> to(dtype) in both dtypes (checked), at 1 op instead of 7.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


@functools.cache
def _mkldnn_bf16_packing() -> bool:
    """Whether this torch build has oneDNN's packed linear and this CPU runs its bfloat16 kernels: without
    AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT the reorder raises (seen on an AVX2-only AMD Zen 3)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else settings.cpu_has("avx512bw", "avx_ne_convert")


def _mkldnn_packing_available() -> bool:
    if os.environ.get("LOCALCHAT_NO_PACK"):  # for measurements: the plain ATen path
        return False
    return _mkldnn_bf16_packing()


class PackedLinear:
    """y = x @ W.T + b with W reordered once into oneDNN's blocked layout (bfloat16 on the CPU).

    ATen's bfloat16 linear streams a decode step's weights at ~14 GB/s here; the prepacked oneDNN kernel
    (what torch.compile's CPU backend uses) reaches ~23 GB/s and gives bit-identical results at batch 1
    (benchmarks/NOTES.md). The packed copy is rebuilt if the weight is replaced or modified in place.
    """

    __slots__ = ("weight", "bias", "packed", "stamp")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.packed = None
        self.stamp = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        try:
            stamp = (w.data_ptr(), w._version)
        except RuntimeError:  # an inference tensor has no version counter (and can't be modified in place)
            stamp = (w.data_ptr(), 0)
        if stamp != self.stamp:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            self.stamp = stamp
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def _should_pack(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Prepack for oneDNN where it pays and is exact: bfloat16 activations and weights on the CPU."""
    return (
        x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
        and _mkldnn_packing_available()
    )


def _linear_fn(linear_weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
    if pack:
        return PackedLinear(linear_weight, bias)
    return lambda x: F.linear(x, linear_weight, bias)


def _activation(name: str):
    """transformers' activation by name, for the architectures whose MLP is not SiLU (Gemma's GELU).
    Imported here, not at the top: transformers.activations pulls in its kernel hub and
    torch.distributed.tensor, ~1.9 s of every start for a model that uses SiLU."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, arch: Architecture) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = arch.head_dim
        self.intermediate_size = config.intermediate_size
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.qkv_proj = nn.Linear(hidden, qkv_out, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=arch.o_bias)
        # Qwen3: each q and k head is RMS-normalized over head_dim (same eps) before rope.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if arch.qk_norm else None
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.gate_up_proj = nn.Linear(hidden, 2 * config.intermediate_size, bias=arch.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, hidden, bias=arch.mlp_bias)
        self.act = F.silu if config.hidden_act == "silu" else _activation(config.hidden_act)
        self._fast: tuple | None = None  # (dtype, callables and weights) built on first forward

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x [T, hidden] is the residual stream; it is updated in place and returned."""
        # Plain callables on the weights rather than module calls: a decode step runs this 30 times and on
        # these CPUs each avoided dispatch or Python frame is a measurable share of the step.
        fast = self._fast
        if fast is None or fast[0] != x.dtype:
            fast = self._fast = self._build_fast(x)
        _, qkv_proj, o_proj, gate_up_proj, down_proj, norm1, eps1, norm2, eps2, qk_norm = fast
        tokens, hidden_size = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = qkv_proj(norm1 * F.rms_norm(x, (hidden_size,), eps=eps1))
        qk_size = (heads + kv_heads) * head_dim
        # Q and K sit side by side in the fused output, so one norm and one rotary pass cover both.
        qk = qkv[:, :qk_size].view(tokens, heads + kv_heads, head_dim)
        if qk_norm is not None:
            qk = qk_norm[0] * F.rms_norm(qk, (head_dim,), eps=qk_norm[1])
        qk = apply_rotary(qk, cos, sin)
        value = qkv[:, qk_size:].view(tokens, kv_heads, head_dim)
        k_cache, v_cache = kv_cache
        kernels.write_kv(qk[:, heads:], value, k_cache, v_cache, meta.slot_mapping, meta.backend)
        attn = kernels.paged_attention(qk[:, :heads], k_cache, v_cache, meta, self.scale)
        x.add_(o_proj(attn.reshape(tokens, heads * head_dim)))

        gate_up = gate_up_proj(norm2 * F.rms_norm(x, (hidden_size,), eps=eps2))
        hidden = self.act(gate_up[:, : self.intermediate_size])
        hidden.mul_(gate_up[:, self.intermediate_size :])
        x.add_(down_proj(hidden))
        return x

    def _build_fast(self, x: torch.Tensor) -> tuple:
        # RMSNorm is inlined (same math as RMSNorm.forward). F.rms_norm normalizes bfloat16 input in
        # float32 and rounds once: bit-identical to float() -> 5-op norm -> to(dtype) (checked), 1 op not 7.
        pack = _should_pack(x, self.qkv_proj.weight)
        return (
            x.dtype,
            _linear_fn(self.qkv_proj.weight, self.qkv_proj.bias, pack),
            _linear_fn(self.o_proj.weight, self.o_proj.bias, pack),
            _linear_fn(self.gate_up_proj.weight, self.gate_up_proj.bias, pack),
            _linear_fn(self.down_proj.weight, self.down_proj.bias, pack),
            self.input_layernorm.weight,
            self.input_layernorm.eps,
            self.post_attention_layernorm.weight,
            self.post_attention_layernorm.eps,
            self._qk_norm(),
        )

    def _qk_norm(self) -> tuple[torch.Tensor, float] | None:
        """(weight [heads + kv_heads, head_dim], eps): q_norm's weight on every q head, k_norm's on every k head."""
        if self.q_norm is None:
            return None
        weight = torch.cat((self.q_norm.weight.expand(self.num_heads, -1), self.k_norm.weight.expand(self.num_kv_heads, -1)))
        return weight, self.q_norm.eps


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, heads, D] (transformers' Llama convention).

    cos/sin are either [T, 1, D/2] (the plain form) or, as LlamaForCausalLM.rotary returns them,
    full-width [T, 1, D] with the sign folded into sin ([-sin, sin]): then x*cos + swap_halves(x)*sin
    is 4 ops instead of 7 and gives bit-identical results (a - b == a + (-b)).
    """
    half = x.shape[-1] // 2
    if cos.shape[-1] == x.shape[-1]:
        tokens, heads, dim = x.shape
        swapped = x.view(tokens, heads, 2, half).flip(2).view(tokens, heads, dim)
        out = x * cos
        return out.add_(swapped * sin)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_context: int | None = None,
    ) -> None:
        """max_context: the longest sequence it will run (default the config's max_position_embeddings);
        a sliding window or rope variant that would change the math within it is refused here."""
        super().__init__()
        self.architecture = check_supported(config, max_context)
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = self.architecture.head_dim
        self.vocab_size = config.vocab_size
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Built on the meta device then materialized uninitialized: random init of a vocab-sized
        # embedding takes seconds and the weights are always loaded afterwards.
        with torch.device("meta"):
            # _weight skips nn.Embedding's normal_ init, whose meta-device path imports torch._refs (~0.8 s).
            self.embed_tokens = nn.Embedding(
                config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
            )
            self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.architecture) for _ in range(config.num_hidden_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = None if self.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.to(dtype)  # free on meta tensors
        self.to_empty(device=self.device)
        self.requires_grad_(False)
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        # A plain attribute, not a buffer: a later model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq.to(self.device)
        self._share = False
        # Small steps run here instead when the weights came from a GGUF (localchat/model/native.py).
        self.native = None
        self._head: tuple | None = None  # (weight, dtype, linear) of the LM head, rebuilt when either changes

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def check_context(self, context: int) -> None:
        """Raise UnsupportedModelError if sequences of `context` tokens would need attention we don't implement."""
        check_context(self.config, context)
        check_rope(self.config, context)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        """Shape of one layer's K (or V) pool, as the kernels expect it."""
        return (num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed in float32 exactly as transformers does, once per step for all layers.
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos = (freqs.cos() * self.attention_scaling).to(self.dtype)
        sin = (freqs.sin() * self.attention_scaling).to(self.dtype)
        # Full width with the rotate-half sign folded in (see apply_rotary): fewer ops in every layer.
        return torch.cat((cos, cos), -1)[:, None, :], torch.cat((-sin, sin), -1)[:, None, :]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 logits [S, vocab] for the token rows in logits_indices (all rows if None)."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} KV caches, got {len(kv_caches)}")
        if self.native is not None:  # the GGUF's quantized weights: small steps, and sampled rows, run natively
            logits = self.native.forward(self, input_ids, positions, kv_caches, meta, logits_indices)
            if logits is not None:
                return logits
        x = self.run_layers(input_ids, positions, kv_caches, meta)
        if logits_indices is not None:
            # Norm and LM head only for the rows that are sampled: the head is the largest matmul.
            x = x.index_select(0, logits_indices)
        weight = self.lm_head_weight
        if self._head is None or self._head[0] is not weight or self._head[1] != x.dtype:
            self._head = (weight, x.dtype, _linear_fn(weight, None, _should_pack(x, weight)))
        return self._head[2](self.norm(x)).float()

    def run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states after every layer (K/V written to the pool), before the final norm."""
        x = F.embedding(input_ids, self.embed_tokens.weight)
        cos, sin = self.rotary(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return x

    # ---- weights -------------------------------------------------------------------------------

    @torch.no_grad()
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], share: bool = False) -> None:
        """Load transformers Llama weights (model.layers.N.self_attn.q_proj.weight, ...) into the fused layout.

        share=True adopts tensors that already have the right dtype and device instead of copying them
        (fused Q/K/V and gate/up are always new tensors). Loading from a safetensors mmap this way skips
        writing ~half the model into fresh memory, which is slow on these VMs.
        """
        self._share = share
        self._head = None
        for layer in self.layers:
            layer._fast = None
        loaded: set[str] = set()
        pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        fused_parts = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
        for name, tensor in state_dict.items():
            key = name.removeprefix("model.")
            if "rotary_emb" in key:
                continue
            if key == "lm_head.weight":
                if self.lm_head is not None:
                    self._copy(self.lm_head.weight, tensor, name)
                    loaded.add("lm_head.weight")
                continue  # tied: the embedding is the head (transformers may still list the alias)
            m = re.fullmatch(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)", key)
            if m and m.group(3) in fused_parts:
                layer, proj, kind = int(m.group(1)), m.group(3), m.group(4)
                pending.setdefault((layer, f"{fused_parts[proj]}.{kind}"), {})[proj] = tensor
                continue
            if m:  # o_proj / down_proj
                ours = f"layers.{m.group(1)}.{m.group(3)}.{m.group(4)}"
            else:
                ours = key
            param = self._param(ours, name)
            self._copy(param, tensor, name)
            loaded.add(ours)

        for (layer, fused), parts in pending.items():
            group, kind = fused.split(".")
            order = ("q_proj", "k_proj", "v_proj") if group == "qkv" else ("gate_proj", "up_proj")
            missing = [p for p in order if p not in parts]
            if missing:
                raise KeyError(f"layer {layer} is missing {missing} {kind} tensors")
            ours = f"layers.{layer}.{group}_proj.{kind}"
            param = self._param(ours, ours)
            tensors = [parts[p] for p in order]
            rows = sum(t.shape[0] for t in tensors)
            if rows != param.shape[0] or any(t.shape[1:] != param.shape[1:] for t in tensors):
                raise ValueError(f"{ours}: checkpoint parts {[tuple(t.shape) for t in tensors]} don't fit {tuple(param.shape)}")
            if all(t.dtype == param.dtype and t.device == param.device for t in tensors):
                torch.cat(tensors, out=param)  # straight into the parameter, no temporary
            else:
                param.copy_(torch.cat(tensors))
            loaded.add(ours)

        missing = [n for n, _ in self.named_parameters() if n not in loaded]
        if missing:
            raise KeyError(f"weights missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")

    def _param(self, ours: str, original: str) -> torch.Tensor:
        try:
            return self.get_parameter(ours)
        except AttributeError:
            raise KeyError(f"unexpected checkpoint tensor {original!r}") from None

    def _copy(self, param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
        if self._share and tensor.dtype == param.dtype and tensor.device == param.device and tensor.is_contiguous():
            param.data = tensor.detach()
        else:
            param.copy_(tensor)


__all__ = ["LlamaForCausalLM", "RMSNorm", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "apply_rotary", "rope_inv_freq"]
