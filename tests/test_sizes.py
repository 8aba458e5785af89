"""Sizes the user sets (KV pool, batch limits, context) are checked against this machine's memory before
anything is allocated, and the message names the largest value that fits; that value does fit."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from localchat.model.memory import GIB, InsufficientMemoryError, activation_costs, context_problem, estimate

from helpers.tiny import tiny_llama_config

CONFIG = tiny_llama_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)


def needs(kv_gb: float, tokens: int = 512, seqs: int = 64, available_gb: float = 8.0):
    import torch

    batch = activation_costs(CONFIG, 8192, tokens, seqs)
    return estimate(CONFIG, torch.bfloat16, "cpu", int(kv_gb * GIB), available=int(available_gb * GIB), batch=batch)


@pytest.mark.parametrize("flag, ask", [("--kv-cache-gb", {"kv_gb": 100.0}),
                                       ("--max-num-batched-tokens", {"kv_gb": 1.0, "tokens": 10**6}),
                                       ("--max-num-seqs", {"kv_gb": 1.0, "seqs": 10**6})])
def test_too_big_names_the_largest_value_that_fits_and_it_fits(flag, ask):
    too_big = needs(**ask)
    with pytest.raises(InsufficientMemoryError, match=re.escape(f"the largest value that fits: {flag} ")) as raised:
        too_big.check()
    largest = re.search(re.escape(flag) + r" ([0-9.]+)", str(raised.value)).group(1)
    key = {"--kv-cache-gb": "kv_gb", "--max-num-batched-tokens": "tokens", "--max-num-seqs": "seqs"}[flag]
    value = float(largest) if key == "kv_gb" else int(largest)
    needs(**{**ask, key: value}).check()  # the value named fits
    bigger = value + 0.05 if key == "kv_gb" else int(value * 1.05) + 1
    assert not needs(**{**ask, key: bigger}).fits  # and it is (about) the largest


def test_defaults_fit_and_a_model_too_big_for_any_pool_says_so():
    needs(1.0).check()
    with pytest.raises(InsufficientMemoryError, match="use a smaller model"):
        needs(1.0, available_gb=0.3).check()


def test_a_context_beyond_the_model_or_the_pool_names_the_largest():
    assert context_problem(None, 8192, 100) is None
    assert context_problem(4096, 8192, 10_000) is None
    assert "the largest is 8192" in context_problem(9000, 8192, 10**6)
    assert "the largest context that fits is 2320" in context_problem(4000, 8192, 2320)


def test_generate_with_an_impossible_pool_fails_at_once_with_the_largest_value():
    """The issue's case: `generate --kv-cache-gb 100000` used to hang; it fails before loading anything."""
    proc = subprocess.run([sys.executable, "-m", "localchat", "generate", "hi", "--kv-cache-gb", "100000"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"not enough memory: .* the largest value that fits: --kv-cache-gb [0-9.]+", proc.stderr), proc.stderr
