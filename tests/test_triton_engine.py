"""The whole engine on the Triton kernels (`--attention triton`), run on the CPU under Triton's interpreter: the
default model's greedy ids for a prompt of over 150 tokens, n = 2, equal those of the CPU's own path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import skip_or_fail

pytestmark = pytest.mark.slow

PROMPT = "Summarize the following notes about rivers. " + " ".join(
    ["The river flows from the mountains to the sea, passing farms and towns."] * 10
)


def generate(attention: str) -> dict:
    # A small pool: the interpreter copies every tensor argument (each layer's caches) at every launch.
    cmd = [sys.executable, "-m", "localchat", "generate", PROMPT, "--dtype", "float32", "--temperature", "0",
           "--max-tokens", "4", "--n", "2", "--json", "--kv-cache-gb", "0.02", "--attention", attention]
    # As a user runs it: `--attention triton` switches the interpreter on by itself on the CPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_greedy_ids_under_the_interpreter_equal_the_cpu_path():
    if importlib.util.find_spec("triton") is None:
        skip_or_fail("triton is not installed (pip install triton; bootstrap.sh installs it)")
    triton, cpu = generate("triton"), generate("auto")
    assert len(cpu["prompt_token_ids"]) > 150  # ten blocks of 16 and a partial one
    ids = [o["token_ids"] for o in triton["outputs"]]
    assert ids == [o["token_ids"] for o in cpu["outputs"]]
    assert len(ids) == 2 and all(len(i) == 4 for i in ids)
