"""Every architecture we run (Llama 3.x, Qwen2/2.5, Qwen3, Mistral) against transformers, on tiny
random-weight models built from a config (no download), through the paged engine and from a GGUF file;
and the refusals: another architecture, or a feature we do not implement, never runs wrongly."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers.archs import ARCHITECTURES, reference_greedy, tiny_config, tiny_hf_model
from helpers.gguf_files import write_gguf
from helpers.tiny import build_model_from_hf

from localchat.engine import Engine, EngineConfig, SamplingParams
from localchat.model import UnsupportedModelError, load_model
from localchat.model.architectures import (
    architecture,
    check_supported,
    describe,
    head_dim,
    parameter_count,
)
from localchat.model.llama import LlamaForCausalLM
from localchat.model.loader import LoadedModel

VOCAB = 2048  # token ids the tiny models know; the tokenizer (the default model's) only decodes them
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def prompts(seed: int, count: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(20, 70))] for _ in range(count)]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request):
    """(architecture, transformers' model, its greedy ids for prompts(1)) for one architecture."""
    hf = tiny_hf_model(request.param, VOCAB, seed=11)
    return request.param, hf, [reference_greedy(hf, p, NEW_TOKENS) for p in prompts(1)]


def engine_on(hf, tokenizer, block_size: int, **kwargs) -> Engine:
    model = LlamaForCausalLM(hf.config, max_context=kwargs.get("max_model_len"))  # checked for this context
    model.load_hf_state_dict(hf.state_dict())
    loaded = LoadedModel(name=hf.config.model_type, config=hf.config, tokenizer=tokenizer, model=model,
                         dtype=torch.float32, device=torch.device("cpu"))
    return Engine.from_loaded(loaded, EngineConfig(block_size=block_size, num_blocks=4096 // block_size, **kwargs))


def check_engine_matches(engine: Engine, hf, expected: list[list[int]]) -> None:
    """Greedy ids equal transformers' generate: batched, on a prefix-cache hit, and as n = 3 forks."""
    ps = prompts(1)
    got = [o.outputs[0].token_ids for o in engine.generate(prompt_token_ids=ps, params=GREEDY)]
    assert got == expected

    # A prompt that starts with a finished one: its full blocks come from the prefix cache.
    longer = ps[0] + expected[0] + [5, 6, 7]
    out = engine.generate(prompt_token_ids=[longer], params=GREEDY)[0]
    assert out.metrics.prefix_hit_tokens >= engine.block_manager.block_size
    assert out.outputs[0].token_ids == reference_greedy(hf, longer, NEW_TOKENS)

    # n = 3 greedy samples fork after the prompt and share its blocks: all three are the reference.
    forks = engine.generate(prompt_token_ids=[ps[1]], params=GREEDY.with_(n=3))[0]
    assert [o.token_ids for o in forks.outputs] == [expected[1]] * 3
    assert forks.metrics.prefix_hit_tokens > 0  # the same prompt ran before: a hit on top of the forks
    figures = engine.block_manager.figures()
    assert figures.blocks_used == 0
    engine.block_manager.check_invariants()


@pytest.mark.parametrize("block_size", [1, 16])
def test_greedy_equals_transformers(tiny, smol_tokenizer, block_size):
    arch, hf, expected = tiny
    engine = engine_on(hf, smol_tokenizer, block_size)
    assert engine.runner.model.architecture.model_type == arch
    check_engine_matches(engine, hf, expected)


def _without_feature(arch: str, hf):
    """transformers' model with what sets `arch` apart switched off (None where nothing is left to switch)."""
    if arch == "llama":
        return tiny_hf_model(arch, VOCAB, seed=11, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    off = copy.deepcopy(hf)
    with torch.no_grad():
        for name, param in off.named_parameters():
            if arch == "qwen2" and name.endswith(".bias"):
                param.zero_()
            if arch == "qwen3" and ("q_norm" in name or "k_norm" in name):
                param.fill_(1.0)
    return None if arch == "mistral" else off


def test_each_feature_changes_the_outputs(tiny):
    """The comparison above can fail: without its rope scaling, biases or q/k norms the logits move by
    far more than the rounding our forward is held to, and the greedy ids change."""
    arch, hf, expected = tiny
    off = _without_feature(arch, hf)
    if off is None:
        pytest.skip("Mistral is the Llama block; its one difference (the sliding window) is refused below")
    long_prompt = torch.tensor([prompts(9, count=1)[0] * 6])
    with torch.no_grad():
        gap = (hf(long_prompt).logits - off(long_prompt).logits).abs().max().item()
    assert gap > 1e-2, gap
    longer = [reference_greedy(m, long_prompt[0].tolist(), NEW_TOKENS) for m in (hf, off)]
    assert longer[0] != longer[1] or [reference_greedy(off, p, NEW_TOKENS) for p in prompts(1)] != expected


def test_architecture_switches_and_parameter_count(tiny):
    arch, hf, _ = tiny
    switches = architecture(hf.config)
    assert (switches.qkv_bias, switches.qk_norm) == (arch == "qwen2", arch == "qwen3")
    assert parameter_count(hf.config) == sum(p.numel() for p in hf.parameters())
    model = build_model_from_hf(hf)
    layer = model.layers[0]
    # What the native decode step must mirror lives on the layer as plain parameters.
    assert (layer.qkv_proj.bias is not None) == (arch == "qwen2")
    assert (layer.q_norm is not None) == (arch == "qwen3")
    assert describe(hf.config).startswith({"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[arch])


def test_gguf_file_loads_and_matches(tiny, tmp_path, monkeypatch):
    """The same model written as llama.cpp writes it (its names, Q/K permutation, rope_freqs) loads
    through `--model file.gguf` with the file's own tokenizer and chat template, and gives the same ids."""
    arch, hf, expected = tiny
    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path / "cache"))
    path = write_gguf(hf, tmp_path / f"tiny-{arch}.gguf", name=f"tiny {arch}")
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert loaded.converted and loaded.name == str(path)
    expected_type = "llama" if arch == "mistral" else arch  # llama.cpp files Mistral under "llama"
    assert loaded.config.model_type == expected_type
    if arch == "llama":  # rope_freqs kept (transformers alone drops it), as divisors: not a known Llama 3 set
        assert len(loaded.config.rope_freq_factors) == 8 and max(loaded.config.rope_freq_factors) == 8.0
    assert loaded.model.head_dim == head_dim(hf.config)  # Qwen3's 24, not transformers' GGUF default of 128
    assert "<|im_start|>" in loaded.tokenizer.chat_template
    assert loaded.tokenizer.decode(loaded.tokenizer("Hello there")["input_ids"]) == "Hello there"
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=16, num_blocks=256))
    check_engine_matches(engine, hf, expected)
    assert not load_model(str(path), dtype="float32", device="cpu").converted  # cached after the first time


def test_gguf_rope_freqs_of_llama_3_2_become_its_rope_parameters(tmp_path, monkeypatch):
    """Llama 3.2's own rope_freqs are recognized as its "llama3" parameters, so the converted config
    (and transformers on it) computes exactly the frequencies the original does."""
    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path / "cache"))
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = tiny_hf_model("llama", VOCAB, seed=5, rope_parameters=rope, max_position_embeddings=131072)
    loaded = load_model(str(write_gguf(hf, tmp_path / "llama-3.2.gguf")), dtype="float32", device="cpu")
    assert loaded.config.rope_parameters == rope and not getattr(loaded.config, "rope_freq_factors", None)
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=16, num_blocks=256))
    ps = prompts(2)
    got = [o.outputs[0].token_ids for o in engine.generate(prompt_token_ids=ps, params=GREEDY)]
    assert got == [reference_greedy(hf, p, NEW_TOKENS) for p in ps]


# ---- refusals ----------------------------------------------------------------------------------


def test_another_architecture_is_refused():
    from transformers import Phi3Config

    config = Phi3Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8)
    with pytest.raises(UnsupportedModelError, match=r"model_type 'phi3' is not supported \(supported: llama, mistral, qwen2, qwen3\)"):
        check_supported(config)


def test_sliding_window_is_refused_only_where_it_matters(smol_tokenizer):
    config = tiny_config("mistral", VOCAB, sliding_window=128)  # context 512 > window
    with pytest.raises(UnsupportedModelError, match=r"sliding-window attention \(window 128 tokens on 2 of 2 layers\).*context_length: 128"):
        check_supported(config)
    check_supported(config, context=128)  # within the window nothing is masked: runs
    hf = tiny_hf_model("mistral", VOCAB, sliding_window=128)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        engine_on(hf, smol_tokenizer, 16)  # the engine's context is the config's 512
    model = LlamaForCausalLM(hf.config, max_context=128)
    model.load_hf_state_dict(hf.state_dict())
    loaded = LoadedModel(name="m", config=hf.config, tokenizer=smol_tokenizer, model=model, dtype=torch.float32,
                         device=torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):  # the engine checks its own context too
        Engine.from_loaded(loaded, EngineConfig(num_blocks=64))
    engine = engine_on(hf, smol_tokenizer, 16, max_model_len=128)
    ps = prompts(3, count=1)
    assert engine.generate(prompt_token_ids=ps, params=GREEDY)[0].outputs[0].token_ids == reference_greedy(hf, ps[0], NEW_TOKENS)

    qwen = tiny_config("qwen2", VOCAB)
    qwen.use_sliding_window, qwen.sliding_window, qwen.layer_types = True, 64, ["full_attention", "sliding_attention"]
    with pytest.raises(UnsupportedModelError, match=r"window 64 tokens on 1 of 2 layers"):
        check_supported(qwen)
    qwen.use_sliding_window = False  # the flag Qwen checkpoints ship with: no window at all
    check_supported(qwen)


@pytest.mark.parametrize(
    "rope, context, message",
    [
        ({"rope_type": "proportional", "rope_theta": 1e4}, None, "unknown rope_type 'proportional'"),
        ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
          "original_max_position_embeddings": 64}, None, "longrope"),
        ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 1024, "dynamic"),
    ],
)
def test_rope_types_we_do_not_run_are_refused(rope, context, message):
    config = tiny_config("qwen3", VOCAB, rope_parameters=rope)
    with pytest.raises(UnsupportedModelError, match=message):
        check_supported(config, context)


def test_gguf_of_another_architecture_is_refused_before_conversion(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma")
    writer.add_name("not ours")
    for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, 8), (writer.add_block_count, 1),
                       (writer.add_feed_forward_length, 16), (writer.add_head_count, 2), (writer.add_head_count_kv, 1),
                       (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_key_length, 4), (writer.add_value_length, 4)):
        add(value)
    writer.add_tensor("token_embd.weight", torch.zeros(16, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="model_type 'gemma' is not supported"):
        load_model(str(path), dtype="float32", device="cpu")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_gguf_file_runs_on_the_native_step(tiny, tmp_path, monkeypatch):
    """The same file run by `--weights gguf`: every layer in one native call per step (Q/K/V bias, per-head q/k
    norms, llama.cpp's Q/K order undone), in float32 with a float32 KV pool, gives transformers' greedy ids."""
    from localchat.model.native import NativeForward

    if not NativeForward.available():
        from conftest import skip_or_fail

        skip_or_fail("the native kernels could not be built (needs g++)")
    arch, hf, expected = tiny
    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path / "cache"))
    path = write_gguf(hf, tmp_path / f"tiny-{arch}.gguf", name=f"tiny {arch}")
    loaded = load_model(str(path), dtype="float32", device="cpu", weights="gguf")
    assert loaded.weights == "gguf:F32" and loaded.model.native is not None
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=16, num_blocks=256))
    check_engine_matches(engine, hf, expected)
