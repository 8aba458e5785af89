"""The default model on its GGUF's own quantized weights (`--weights gguf`): what runs, how close it stays to
the float32 reference, and the engine's invariants on that path (batching, block size and preemption don't
change greedy outputs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import skip_or_fail
from localchat.bench.quality import CHAT_PROMPTS, agreement, greedy_replies, perplexity_ids
from localchat.engine import Engine, EngineConfig, SamplingParams
from localchat.model import load_model
from localchat.model.evaluate import perplexity
from gguf import GGMLQuantizationType as Q

from kernels import quant
from localchat import settings
from localchat.cli import main
from localchat.model import resolve_model
from localchat.model.loader import default_dtype, dense_bytes_per_token, resolve_activations
from localchat.model.native import NativeForward

pytestmark = pytest.mark.slow


def rounds_here() -> bool:
    """Whether this CPU's build has integer-activation kernels for the default model's types (Q4_1, Q8_0)."""
    return bool({int(Q.Q4_1), int(Q.Q8_0)} & quant.integer_types())


@pytest.fixture(scope="module")
def quantized():
    if not NativeForward.available():
        skip_or_fail("the native kernels could not be built (needs g++)")
    return load_model(None, weights="gguf")


def test_the_files_own_blocks_run(quantized):
    # The prompts' dense path and the KV cache: bfloat16 where the CPU multiplies it natively, else float32.
    assert quantized.weights == "gguf:Q4_1+Q8_0" and quantized.dtype == default_dtype("cpu")
    native = quantized.model.native
    assert native is not None and native.weights.types() == {"Q4_1": 210, "Q8_0": 1}
    # 30 layers of Q4_1 (5 bits a weight) and the tied Q8_0 head, against the same weights in bfloat16.
    assert 90e6 < quantized.weight_bytes_per_token < 100e6
    assert quantized.weight_bytes_per_token < 0.4 * dense_bytes_per_token(quantized.model)
    # 16-bit activations where this CPU's build has integer kernels for its types, else float32 (loader.resolve_activations)
    assert quantized.activations == native.activations == ("int16" if rounds_here() else "float32")
    # prompt chunks natively up to 8 tokens beside a bfloat16 dense path, 32 beside a float32 one (native.py)
    assert native.max_tokens == (8 if quantized.dtype == torch.bfloat16 else 32)


def test_activation_choices_are_checked(capsys):
    spec = resolve_model(None)
    # the settings' choices are the kernels' (kernels/quant.py cannot import localchat.settings)
    assert set(settings.ACTIVATIONS) == set(quant.ACTIVATION_BITS)
    for choice in ("float32", "int16", "int8"):
        assert resolve_activations(choice, "gguf") == choice
    assert resolve_activations(None, "gguf") == "int16" and resolve_activations(None, "float32") == "float32"
    with pytest.raises(ValueError, match="unknown activations"):
        resolve_activations("int4", "gguf")
    with pytest.raises(ValueError, match="--weights gguf"):
        resolve_activations("int16", "bfloat16")
    # int8 runs where some tensor's type has integer kernels in this CPU's build (the AVX2 one)
    rounded = load_model(spec, weights="gguf", activations="int8")
    assert rounded.activations == rounded.model.native.activations == ("int8" if rounds_here() else "float32")
    assert main(["generate", "Hi", "--max-tokens", "4", "--weights", "float32", "--activations", "int8"]) == 2
    assert "--weights gguf" in capsys.readouterr().err


def test_closer_to_float32_than_the_bfloat16_path(quantized, smol):
    """Greedy replies and perplexity of the quantized path against the float32 dequantization of the same file
    (the model itself), compared with what the dense bfloat16 path achieves."""
    bf16 = load_model(None, weights="bfloat16")
    reference = greedy_replies(smol, CHAT_PROMPTS, 32)
    replies = greedy_replies(quantized, CHAT_PROMPTS, 32)
    ours = agreement(replies, reference)
    dense = agreement(greedy_replies(bf16, CHAT_PROMPTS, 32), reference)
    assert ours["common_prefix_share"] >= dense["common_prefix_share"], (ours, dense)
    assert ours["identical"] >= 3, ours
    ids = perplexity_ids(smol.tokenizer)
    ppl, ref_ppl = perplexity(quantized, ids), perplexity(smol, ids)
    assert abs(ppl / ref_ppl - 1) < 0.005, (ppl, ref_ppl)
    if quantized.activations == "int16":
        # what rounding the matmuls' inputs to 16 bits costs: nothing a reply shows (benchmarks/NOTES.md, session
        # 10: 12 of 12 identical, perplexity within 0.001%; 8 bits changed the answer to "What is the capital of
        # France?", which tests/test_cli.py asks with the default activations)
        native = quantized.model.native
        native.activations = "float32"
        try:
            exact = greedy_replies(quantized, CHAT_PROMPTS, 32)
            exact_ppl = perplexity(quantized, ids)
        finally:
            native.activations = "int16"
        assert agreement(replies, exact)["identical"] >= 11
        assert abs(ppl / exact_ppl - 1) < 5e-4, (ppl, exact_ppl)


def test_batching_block_size_and_preemption_dont_change_greedy_ids(quantized):
    prompts = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:6]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run(config, together=True):
        engine = Engine.from_loaded(quantized, config)
        if together:
            return [o.outputs[0].token_ids for o in engine.generate(messages=prompts, params=params)]
        return [engine.generate(messages=[m], params=params)[0].outputs[0].token_ids for m in prompts]

    batched = run(EngineConfig(num_blocks=256))
    assert batched == run(EngineConfig(num_blocks=256), together=False)
    assert batched == run(EngineConfig(num_blocks=4096, block_size=1))
    small = Engine.from_loaded(quantized, EngineConfig(num_blocks=12, block_size=16))  # 192 slots for 6 x ~60 tokens
    outs = small.generate(messages=prompts, params=params)
    assert [o.outputs[0].token_ids for o in outs] == batched and small.block_manager.preemptions > 0


def test_generate_says_which_weights_ran():
    proc = subprocess.run([sys.executable, "-m", "localchat", "generate", "Hi", "--max-tokens", "4", "--temperature", "0",
                           "--json", "--weights", "gguf"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["weights"] == "gguf:Q4_1+Q8_0" and 90e6 < doc["weight_bytes_per_token"] < 100e6
    assert doc["activations"] == ("int16" if rounds_here() else "float32")
    proc = subprocess.run([sys.executable, "-m", "localchat", "generate", "Hi", "--max-tokens", "4", "--weights", "gguf",
                           "--device", "cuda"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
