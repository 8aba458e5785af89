"""A GGUF file's weights as they are stored (quantized blocks), mapped onto our forward pass's layers.

A decode step streams every weight once, so the GGUF's own blocks (the default model's Q4_1 file: ~96 MB
a token) beat its bfloat16 expansion (269 MB) by the ratio of their sizes; kernels/quant.py multiplies
them in place. Norms and biases are small and become float32 tensors.

llama.cpp's converter stores the Q and K rows of Llama-family models (architecture "llama", which Mistral
files use too) permuted for its interleaved rope; our forward rotates halves, as transformers does, so
those rows are put back in transformers' order here. A permutation of whole rows moves whole blocks, so
the quantized data needs no re-quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels.quant import QuantizedWeight

# GGUF architectures whose converter permutes Q/K rows (llama.cpp's convert_hf_to_gguf LlamaModel).
PERMUTED_QK = ("llama",)


class GGUFWeightsError(ValueError):
    """The GGUF file does not hold the weights this model needs (wrong file, or an unsupported layout)."""


@dataclass
class LayerWeights:
    q: QuantizedWeight
    k: QuantizedWeight
    v: QuantizedWeight
    o: QuantizedWeight
    gate: QuantizedWeight
    up: QuantizedWeight
    down: QuantizedWeight
    attn_norm: torch.Tensor  # float32 [hidden]
    ffn_norm: torch.Tensor
    qkv_bias: torch.Tensor | None = None  # float32 [q_rows + 2 * kv_rows] (Qwen2)
    q_norm: torch.Tensor | None = None  # float32 [head_dim] (Qwen3: RMSNorm of each head before rope)
    k_norm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down))


@dataclass
class GGUFWeights:
    architecture: str
    embed: QuantizedWeight  # [vocab, hidden]
    final_norm: torch.Tensor
    lm_head: QuantizedWeight  # the embedding itself when the model ties them
    layers: list[LayerWeights] = field(default_factory=list)

    @property
    def tied(self) -> bool:
        return self.lm_head is self.embed

    def bytes_per_token(self) -> int:
        """Weight bytes a decode step streams: every layer's projections and the LM head (the embedding
        reads one row per token, which is negligible)."""
        return sum(layer.nbytes for layer in self.layers) + self.lm_head.nbytes

    def types(self) -> dict[str, int]:
        """How many weights of each ggml type the file's projections use (e.g. {"Q4_1": 210, "Q8_0": 1})."""
        counts: dict[str, int] = {}
        weights = [self.lm_head] + [w for layer in self.layers for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)]
        for w in weights:
            counts[w.type_name] = counts.get(w.type_name, 0) + 1
        return counts


def qk_unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns llama.cpp's interleaved-rope Q/K rows back into transformers' order.

    Within a head of D rows, transformers' row s * D/2 + i (s in {0, 1}, i < D/2) is stored at 2 * i + s.
    """
    d = rows // heads
    r = torch.arange(rows)
    head, rem = r // d, r % d
    return head * d + 2 * (rem % (d // 2)) + rem // (d // 2)


class _Reader:
    """Tensors of one GGUF file by name, with clear errors for missing or misshapen ones."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(str(path))
        except Exception as exc:  # the gguf package raises several types for a file it can't parse
            raise GGUFWeightsError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}
        field_ = self.reader.fields.get("general.architecture")
        self.architecture = bytes(field_.parts[field_.data[0]]).decode() if field_ is not None else "?"

    def has(self, name: str) -> bool:
        return name in self.tensors

    def quantized(self, name: str, rows: int, cols: int) -> QuantizedWeight:
        w = QuantizedWeight.from_gguf(self._get(name))
        if w.shape != (rows, cols):
            raise GGUFWeightsError(f"{self.path.name}: {name} is {w.rows} x {w.cols}, the model needs {rows} x {cols}")
        return w

    def vector(self, name: str, size: int) -> torch.Tensor:
        tensor = self._get(name)
        values = QuantizedWeight.from_gguf(tensor).dequantize(torch.float32).reshape(-1)
        if values.numel() != size:
            raise GGUFWeightsError(f"{self.path.name}: {name} has {values.numel()} values, the model needs {size}")
        return values.contiguous()

    def _get(self, name: str):
        tensor = self.tensors.get(name)
        if tensor is None:
            raise GGUFWeightsError(f"{self.path.name} has no tensor {name!r} (architecture {self.architecture})")
        return tensor


def read_gguf_weights(path: str | Path, config) -> GGUFWeights:
    """The weights of `path` for a model with this transformers config, quantized blocks kept as they are."""
    reader = _Reader(Path(path))
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    permuted = reader.architecture in PERMUTED_QK
    q_order = qk_unpermute_index(q_rows, heads) if permuted else None
    k_order = qk_unpermute_index(kv_rows, kv_heads) if permuted else None
    unsupported = sorted(n for n in reader.tensors if n.endswith(".bias") and n.split(".")[-2] not in ("attn_q", "attn_k", "attn_v"))
    if unsupported:  # the native step has biases on Q/K/V only (Qwen2); anything else would be silently dropped
        raise GGUFWeightsError(f"{reader.path.name} has biases the native step does not apply ({', '.join(unsupported[:3])})")
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"blk.{i}."
        q = reader.quantized(p + "attn_q.weight", q_rows, hidden)
        k = reader.quantized(p + "attn_k.weight", kv_rows, hidden)
        layer = LayerWeights(
            q=q.select_rows(q_order) if permuted else q,
            k=k.select_rows(k_order) if permuted else k,
            v=reader.quantized(p + "attn_v.weight", kv_rows, hidden),
            o=reader.quantized(p + "attn_output.weight", hidden, q_rows),
            gate=reader.quantized(p + "ffn_gate.weight", inter, hidden),
            up=reader.quantized(p + "ffn_up.weight", inter, hidden),
            down=reader.quantized(p + "ffn_down.weight", hidden, inter),
            attn_norm=reader.vector(p + "attn_norm.weight", hidden),
            ffn_norm=reader.vector(p + "ffn_norm.weight", hidden),
        )
        if reader.has(p + "attn_q.bias"):
            biases = [reader.vector(p + f"attn_{n}.bias", rows) for n, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))]
            if permuted:
                biases[0], biases[1] = biases[0][q_order], biases[1][k_order]
            layer.qkv_bias = torch.cat(biases)
        if reader.has(p + "attn_q_norm.weight"):
            layer.q_norm = reader.vector(p + "attn_q_norm.weight", head_dim)
            layer.k_norm = reader.vector(p + "attn_k_norm.weight", head_dim)
        layers.append(layer)
    vocab = config.vocab_size
    embed = reader.quantized("token_embd.weight", vocab, hidden)
    head = reader.quantized("output.weight", vocab, hidden) if reader.has("output.weight") else embed
    return GGUFWeights(reader.architecture, embed, reader.vector("output_norm.weight", hidden), head, layers)


def dequantized_rows(weight: QuantizedWeight, ids: torch.Tensor) -> torch.Tensor:
    """Float32 rows `ids` of a quantized table (the embedding lookup of a step's tokens)."""
    return weight.dequantize_rows(ids.tolist())


__all__ = ["GGUFWeights", "GGUFWeightsError", "LayerWeights", "dequantized_rows", "qk_unpermute_index", "read_gguf_weights"]
