"""The CPU path's batching shortcuts (length-grouped decode, decode rows of mixed steps, reused buffers)
against the dense reference of test_attention."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import skip_or_fail

from kernels import torch_ops
from tests.test_attention import run_case


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_with_spread_lengths_uses_groups(seed, dtype, atol):
    rng = random.Random(seed)
    # Lengths spread enough that the decode path splits the batch into several padded groups.
    ctx_lens = [rng.choice([1, 2, 5, 40, 90, 200, 333]) for _ in range(12)]
    assert len(torch_ops._split_groups(ctx_lens, 4)) > 1 or max(ctx_lens) - min(ctx_lens) < 8
    run_case(ctx_lens, [1] * len(ctx_lens), 4, kv_heads=2, group=3, seed=seed, dtype=dtype, atol=atol)


@pytest.mark.parametrize("seed", range(3))
def test_mixed_step_with_many_decode_rows(seed):
    rng = random.Random(10 + seed)
    ctx_lens, q_lens = [], []
    for _ in range(10):
        c = rng.randint(1, 120)
        ctx_lens.append(c)
        q_lens.append(rng.choice([1, 1, 1, c, rng.randint(1, c)]))
    q_lens[0] = max(2, min(ctx_lens[0], 5)) if ctx_lens[0] > 1 else 1  # at least one prompt chunk
    ctx_lens[0] = max(ctx_lens[0], q_lens[0])
    run_case(ctx_lens, q_lens, 16, kv_heads=1, group=3, seed=seed)


def test_split_groups_cover_every_row_once():
    lens = [5, 1500, 30, 31, 700, 16, 16, 1, 900, 64]
    groups = torch_ops._split_groups(lens, 16)
    assert sorted(r for g in groups for r in g) == list(range(len(lens)))
    assert len(groups) > 1
    assert torch_ops._split_groups([100] * 8, 16) == [list(range(8))]


def test_packed_linear_matches_and_follows_weight_changes():
    from localchat.model.llama import PackedLinear, _mkldnn_packing_available

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        skip_or_fail("oneDNN weight packing not available in this torch build")
    if not _mkldnn_packing_available():
        pytest.skip("this CPU has no bfloat16 oneDNN kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")
    torch.manual_seed(0)
    w = torch.randn(64, 32).to(torch.bfloat16)
    b = torch.randn(64).to(torch.bfloat16)
    lin = PackedLinear(w, b)
    x1 = torch.randn(1, 32).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(lin(x1), torch.nn.functional.linear(x1, w, b))  # batch 1: bit-identical
        x = torch.randn(7, 32).to(torch.bfloat16)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, b), atol=3e-2, rtol=2e-2)
    w.mul_(-1)  # an in-place change must not leave a stale packed copy
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, b), atol=3e-2, rtol=2e-2)


def test_bf16_forward_uses_packed_path_and_matches_plain_path(monkeypatch):
    """Our bf16 model with packed linears gives the same logits as with ATen's linear (to bf16 rounding)."""
    import kernels
    from localchat.model import llama as llama_mod
    from helpers.tiny import build_model_from_hf, tiny_llama_config
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    hf = HFLlama(tiny_llama_config()).eval()
    model = build_model_from_hf(hf, dtype=torch.bfloat16)
    caches = [(torch.zeros(model.kv_cache_shape(8, 4), dtype=torch.bfloat16), torch.zeros(model.kv_cache_shape(8, 4), dtype=torch.bfloat16)) for _ in range(model.num_layers)]
    ids = torch.tensor([3, 17, 42, 9, 100])
    meta = kernels.build_metadata([[1, 2]], [5], [5], 4)
    packed = model(ids, torch.arange(5), caches, meta)
    assert isinstance(model.layers[0]._fast[1], llama_mod.PackedLinear) == llama_mod._mkldnn_packing_available()
    monkeypatch.setenv("LOCALCHAT_NO_PACK", "1")
    for layer in model.layers:
        layer._fast = None
    model._head = None
    plain = model(ids, torch.arange(5), caches, kernels.build_metadata([[1, 2]], [5], [5], 4))
    assert not isinstance(model.layers[0]._fast[1], llama_mod.PackedLinear)
    torch.testing.assert_close(packed, plain, atol=5e-2, rtol=5e-2)
