"""Our Llama forward over a paged KV pool against transformers' LlamaForCausalLM (random tiny weights)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM as HFLlama

from kernels import build_metadata
from localchat.model.llama import LlamaForCausalLM
from helpers.tiny import build_model_from_hf, tiny_llama_config

ATOL = 1e-4

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa3-odd": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=1, intermediate_size=100),
    "gqa3-tied": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3-rope": dict(
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_size=48,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "linear-rope-bias": dict(
        attention_bias=True, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}
    ),
    "yarn-rope": dict(
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
    ),
}


def make_pair(name: str, seed: int = 0) -> tuple[HFLlama, LlamaForCausalLM]:
    torch.manual_seed(seed)
    config = tiny_llama_config(**CONFIGS[name])
    hf = HFLlama(config).eval()
    # Non-trivial norm weights and biases, so a mix-up in loading would show.
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
    return hf, build_model_from_hf(hf)


def hf_logits(hf: HFLlama, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


class Pool:
    """A paged KV pool with hand-made, shuffled block assignment (no block manager needed)."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.caches = [
            (torch.zeros(model.kv_cache_shape(num_blocks, block_size)), torch.zeros(model.kv_cache_shape(num_blocks, block_size)))
            for _ in range(model.num_layers)
        ]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}

    def reserve(self, seq: int, length: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * self.block_size < length:
            table.append(self.free.pop())
        return table


def step(model, pool, batch: list[tuple[int, list[int], int]]) -> torch.Tensor:
    """One forward over several sequences: (seq id, all token ids so far, number of new tokens)."""
    input_ids, positions, tables, ctx_lens, q_lens = [], [], [], [], []
    for seq, ids, new in batch:
        tables.append(pool.reserve(seq, len(ids)))
        input_ids += ids[len(ids) - new :]
        positions += range(len(ids) - new, len(ids))
        ctx_lens.append(len(ids))
        q_lens.append(new)
    meta = build_metadata(tables, ctx_lens, q_lens, pool.block_size)
    last = torch.tensor(q_lens).cumsum(0) - 1
    return model(torch.tensor(input_ids), torch.tensor(positions), pool.caches, meta, last)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_prefill_logits_match_transformers(name, block_size):
    hf, ours = make_pair(name)
    ids = torch.randint(0, hf.config.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    pool = Pool(ours, num_blocks=64, block_size=block_size)
    table = pool.reserve(0, len(ids))
    meta = build_metadata([table], [len(ids)], [len(ids)], block_size)
    all_rows = torch.arange(len(ids))
    logits = ours(torch.tensor(ids), torch.arange(len(ids)), pool.caches, meta, all_rows)
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), hf.config.vocab_size)
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gqa3-odd", "gqa3-tied", "yarn-rope"])
def test_decode_over_prefix_written_from_transformers_cache(name):
    """Prefix K/V come from transformers' own cache, written by hand into shuffled blocks."""
    hf, ours = make_pair(name)
    block_size = 3
    prefix = torch.randint(0, hf.config.vocab_size, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        cache = hf(torch.tensor([prefix]), use_cache=True).cache
    pool = Pool(ours, num_blocks=40, block_size=block_size, seed=3)
    table = pool.reserve(0, len(prefix))
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(len(prefix))])
    for (k_cache, v_cache), layer in zip(pool.caches, cache.layers):
        # transformers keeps [batch, kv_heads, seq, head_dim]; the pool wants [slot, kv_heads, head_dim]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = layer.keys[0].transpose(0, 1)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = layer.values[0].transpose(0, 1)

    tail = [5, 77, 3, 200, 9, 41]
    # Causal: row p of one full-sequence transformers call is the next-token logits after ids[: p + 1].
    expected = hf_logits(hf, prefix + tail)
    ids = list(prefix)
    for token in tail:
        ids.append(token)
        logits = step(ours, pool, [(0, ids, 1)])
        torch.testing.assert_close(logits[0], expected[len(ids) - 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mha", "gqa3-odd", "llama3-rope", "linear-rope-bias"])
def test_mixed_batch_prefill_prefix_hit_and_decode(name):
    """One step holding a fresh prefill, a chunk after a cached prefix and decodes; then decode-only steps."""
    hf, ours = make_pair(name)
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(4)
    decode_steps = 4
    # Each sequence's final tokens; row p of one transformers call on them is the reference after ids[: p + 1].
    full = {s: torch.randint(0, vocab, (n + decode_steps,), generator=gen).tolist() for s, n in enumerate([12, 30, 17, 35])}
    expected = {s: hf_logits(hf, ids) for s, ids in full.items()}
    pool = Pool(ours, num_blocks=200, block_size=4, seed=5)

    def check(logits, batch):
        for row, (seq, ids, _) in enumerate(batch):
            torch.testing.assert_close(logits[row], expected[seq][len(ids) - 1], atol=ATOL, rtol=0)

    # Warm up the cache for seq 1 (first 22 tokens), seq 2 (all but its last prompt token), seq 3 (first 20).
    step(ours, pool, [(1, full[1][:22], 22), (2, full[2][:16], 16), (3, full[3][:20], 20)])

    # Mixed: seq 0 fresh prefill, seq 1 prefix hit (8 new over 22 cached), seq 2 decode, seq 3 chunk of 15.
    batch = [(0, full[0][:12], 12), (1, full[1][:30], 8), (2, full[2][:17], 1), (3, full[3][:35], 15)]
    check(step(ours, pool, batch), batch)

    # Decode-only steps over different context lengths (the gathered fast path).
    lengths = {0: 12, 1: 30, 2: 17, 3: 35}
    for _ in range(decode_steps):
        batch = [(s, full[s][: lengths[s] + 1], 1) for s in full]
        lengths = {s: n + 1 for s, n in lengths.items()}
        check(step(ours, pool, batch), batch)


def test_bfloat16_close_to_float32():
    hf, ours32 = make_pair("gqa3-odd")
    ours16 = build_model_from_hf(hf, dtype=torch.bfloat16)
    ids = list(range(3, 30))
    out = {}
    for label, model in (("32", ours32), ("16", ours16)):
        pool = Pool(model, 16, 8)
        pool.caches = [(k.to(model.dtype), v.to(model.dtype)) for k, v in pool.caches]
        out[label] = step(model, pool, [(0, ids, len(ids))])
    assert out["16"].dtype == torch.float32
    assert (out["16"] - out["32"]).abs().max() < 0.1 * out["32"].abs().max()


def test_tied_head_shares_embedding():
    _, ours = make_pair("gqa3-tied")
    assert ours.lm_head is None and ours.lm_head_weight is ours.embed_tokens.weight
    _, untied = make_pair("mha")
    assert untied.lm_head is not None


def test_load_rejects_missing_and_unknown_tensors():
    hf, _ = make_pair("mha")
    model = LlamaForCausalLM(hf.config)
    state = dict(hf.state_dict())
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match="k_proj"):
        model.load_hf_state_dict(state)
    state = dict(hf.state_dict())
    state["model.layers.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="mystery"):
        model.load_hf_state_dict(state)


def test_unsupported_model_type():
    from transformers import Phi3Config

    from localchat.model.llama import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="phi3"):
        LlamaForCausalLM(Phi3Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8))


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
          "original_max_position_embeddings": 64}, "longrope"),
        ({"rope_type": "no-such-rope", "rope_theta": 10000.0}, "no-such-rope"),
        ({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, "partial rotary"),
    ],
)
def test_refused_rope_variants_are_clear_value_errors(rope, message):
    from localchat.model.llama import UnsupportedModelError, rope_inv_freq
    from helpers.tiny import tiny_llama_config

    config = tiny_llama_config()
    config.rope_parameters = rope
    with pytest.raises(UnsupportedModelError, match=message) as err:
        rope_inv_freq(config)
    assert isinstance(err.value, ValueError)
