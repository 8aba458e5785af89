"""The forward pass of small steps (decode, short prompt chunks) on a GGUF's own quantized weights, natively.

One call of kernels/decode_step.py runs every layer for the step's tokens on the weights as the GGUF stores
them (kernels/quant.py), reading and writing K/V through the block tables; Python only looks up the
embeddings, computes rope's cos/sin once, and applies the final norm and the LM head to the sampled rows.
Larger steps (long prompt chunks, big batches) stay on the torch path of localchat/model/llama.py with
dense weights, where a matrix-matrix product is faster than streaming blocks token by token.

The quantized matmuls' inputs are `activations` (loader.resolve_activations): rounded to 16 bits per block of
32 where the kernels have that path and the user kept the default, or float32, or 8 bits; the K/V pool is the
model's (bfloat16 where the CPU has it), shared with the torch path, which writes the same slots for the
prompt chunks it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import AttentionMetadata, build_metadata, decode_step, quant
from localchat.model.gguf_weights import GGUFWeights, dequantized_rows

# Steps of at most this many tokens run natively. Measured on the 2-core test machines with the default
# model (benchmarks/NOTES.md, "Native decode step"): streaming the blocks once for every 8 tokens still
# beats the dense bfloat16 product up to about 8 tokens; beyond, the torch path's packed GEMM wins.
NATIVE_MAX_TOKENS = 8
# The same where the dense path is float32 (a CPU without native bfloat16): there its GEMM is ~3x slower,
# and a 32-token chunk took 128-156 ms natively against 219-254 ms dense (benchmarks/NOTES.md, session 10).
NATIVE_MAX_TOKENS_FLOAT32_DENSE = 32


class NativeForward:
    """What LlamaForCausalLM.forward delegates small steps to when its weights came from a GGUF."""

    def __init__(self, config, weights: GGUFWeights, inv_freq: torch.Tensor, attention_scaling: float,
                 dense_dtype: torch.dtype = torch.bfloat16) -> None:
        self.config = config
        self.max_tokens = NATIVE_MAX_TOKENS if dense_dtype == torch.bfloat16 else NATIVE_MAX_TOKENS_FLOAT32_DENSE
        self.activations = "float32"  # set by the loader (loader._set_activations)
        self.weights = weights
        self.inv_freq = inv_freq.to(torch.float32).contiguous()
        self.final_norm = weights.final_norm.detach().to(torch.float32).contiguous()
        self.attention_scaling = attention_scaling
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = float(config.rms_norm_eps)
        self._plan: decode_step.StepPlan | None = None
        self._plan_caches: tuple[int, ...] = ()
        self._plan_list = None  # the list the plan was last checked against

    @staticmethod
    def available() -> bool:
        return decode_step.available() and quant.available()

    def forward(self, model, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata,
                logits_indices: torch.Tensor | None) -> torch.Tensor | None:
        """Logits for the step, or None when the torch path should run it all (a large step, or a pool of
        another dtype). A large step whose sampled rows are few runs the other rows through the torch path
        first (their K/V land in the pool) and the sampled rows here: each sequence's next token then comes
        from the float32 forward on the file's own weights, whatever ran its prompt."""
        if kv_caches[0][0].dtype not in (torch.float32, torch.bfloat16) or meta.backend is not None:
            return None  # another pool dtype, or an attention backend asked for by name (--attention)
        num_tokens = input_ids.numel()
        if num_tokens <= self.max_tokens:
            return self(input_ids, positions, kv_caches, meta, logits_indices)
        if logits_indices is None or not 0 < logits_indices.numel() <= self.max_tokens:
            return None
        sampled = torch.zeros(num_tokens, dtype=torch.bool)
        sampled[logits_indices] = True
        others = (~sampled).nonzero().squeeze(1)
        model.run_layers(input_ids[others], positions[others], kv_caches, _without_last_rows(meta, sampled))
        rows = logits_indices
        sub = _rows_meta(meta, rows)
        return self(input_ids[rows], positions[rows], kv_caches, sub, None)

    def _plan_for(self, kv_caches) -> decode_step.StepPlan:
        # An engine passes the same list of the same tensors every step: checking that first saves reading
        # every cache's address (~0.1 ms a step).
        if self._plan is not None and kv_caches is self._plan_list and kv_caches[0][0].data_ptr() == self._plan_caches[0]:
            return self._plan
        key = tuple(t.data_ptr() for pair in kv_caches for t in pair)
        self._plan_list = kv_caches
        if self._plan is None or key != self._plan_caches:
            c = self.config
            layers = [
                decode_step.LayerTensors(
                    q=w.q, k=w.k, v=w.v, o=w.o, gate=w.gate, up=w.up, down=w.down, attn_norm=w.attn_norm,
                    ffn_norm=w.ffn_norm, k_cache=k, v_cache=v, qkv_bias=w.qkv_bias, q_norm=w.q_norm, k_norm=w.k_norm,
                )
                for w, (k, v) in zip(self.weights.layers, kv_caches)
            ]
            self._plan = decode_step.StepPlan(
                layers, hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                head_dim=self.head_dim, inter=c.intermediate_size, eps=self.eps, scale=self.head_dim**-0.5,
            )
            self._plan_caches = key
        return self._plan

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata | _Rows,
                 logits_indices: torch.Tensor | None) -> torch.Tensor:
        plan = self._plan_for(kv_caches)
        x = dequantized_rows(self.weights.embed, input_ids)
        # Each token attends to its sequence's positions up to its own: a decode row or a chunk's row alike.
        if isinstance(meta, _Rows):
            token_table = meta.token_table
        elif meta.num_seqs == x.shape[0]:
            token_table = torch.arange(meta.num_seqs, dtype=torch.int32)
        else:
            token_table = torch.repeat_interleave(torch.arange(meta.num_seqs, dtype=torch.int32), torch.tensor(meta.query_lens))
        token_ctx = (positions + 1).to(torch.int32)
        # Rope's cos/sin and the final norm are computed in the step: as torch ops around it they cost ~0.4 ms
        # a token, ~6% of a decode step (benchmarks/NOTES.md, session 19).
        plan.run(x, None, None, meta.slot_mapping, meta.block_tables, token_table, token_ctx, self.activations,
                 rope=(positions.contiguous(), self.inv_freq, float(self.attention_scaling)), final_norm=self.final_norm)
        if logits_indices is not None and logits_indices.tolist() != list(range(x.shape[0])):  # decode rows: all
            x = x.index_select(0, logits_indices)
        return quant.matmul(x, self.weights.lm_head, activations=self.activations)


@dataclass
class _Rows:
    """Some rows of a step, for the native call: their slots, the step's block tables, each row's table."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    token_table: torch.Tensor


def _row_sequences(meta: AttentionMetadata) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(meta.num_seqs, dtype=torch.int32), torch.tensor(meta.query_lens))


def _rows_meta(meta: AttentionMetadata, rows: torch.Tensor) -> _Rows:
    return _Rows(meta.slot_mapping[rows].contiguous(), meta.block_tables, _row_sequences(meta)[rows].contiguous())


def _without_last_rows(meta: AttentionMetadata, sampled: torch.Tensor) -> AttentionMetadata:
    """The step's metadata without the sampled rows, which are each the last new token of their sequence."""
    starts = meta.query_start_loc.tolist()
    tables, contexts, queries = [], [], []
    rows = meta.block_tables.tolist()
    for s, (q, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list)):
        drop = int(bool(sampled[starts[s] + q - 1])) if q else 0
        if q - drop > 0:
            tables.append(rows[s])
            contexts.append(ctx - drop)
            queries.append(q - drop)
    sub = build_metadata(tables, contexts, queries, meta.block_size)
    sub.backend = meta.backend
    return sub
