"""The model listing (`localchat models list`, the page's model picker) reads each model's config.json itself,
without transformers or torch: importing them cost the page's process seconds of CPU the first time a person
opened the settings, taken from the reply being written (benchmarks/NOTES.md, session 14). Its view of a config
must describe the model as transformers' own does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig

from helpers.archs import ARCHITECTURES, tiny_config
from localchat.model.architectures import describe, parameter_count
from localchat.model.catalog import read_config

# Configs as older checkpoints write them: the rope under "rope_scaling" ("type" or "rope_type"), no
# num_key_value_heads (multi-head attention), no rms_norm_eps, no tie_word_embeddings.
OLD_STYLE = [
    {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
     "num_attention_heads": 4, "vocab_size": 300, "rope_theta": 500000.0,
     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256}},
    {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500, "tie_word_embeddings": True,
     "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
     "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 256, "head_dim": None},
]


def _both(directory):
    reference = AutoConfig.from_pretrained(directory)
    ours = read_config(directory)
    return (describe(ours), parameter_count(ours)), (describe(reference), parameter_count(reference))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_saved_config_reads_as_transformers_reads_it(arch, tmp_path):
    tiny_config(arch, 320).save_pretrained(tmp_path)
    ours, reference = _both(tmp_path)
    assert ours == reference


@pytest.mark.parametrize("raw", OLD_STYLE, ids=[r["model_type"] for r in OLD_STYLE])
def test_an_older_config_reads_as_transformers_reads_it(raw, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours, reference = _both(tmp_path)
    assert ours == reference
    assert ("rope" in ours[0]) == (raw.get("rope_scaling") is not None)


def test_listing_the_models_imports_neither_torch_nor_transformers(tmp_path):
    # A local model of the user's own, so that a config is read and described, beside the bundled registry.
    model_dir = tmp_path / "mine"
    model_dir.mkdir()
    tiny_config("qwen3", 320).save_pretrained(model_dir)
    (tmp_path / "config" / "localchat").mkdir(parents=True)
    (tmp_path / "config" / "localchat" / "models.yaml").write_text(f"models:\n  mine:\n    source: local\n    path: {model_dir}\n")
    code = ("import json, sys\nfrom localchat.model.catalog import catalog\n"
            "mine = [e for e in catalog() if e.name == 'mine'][0]\n"
            "print(json.dumps([mine.architecture, mine.parameters, sorted(sys.modules)]))")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "LOCALCHAT_CACHE": str(tmp_path / "cache")}
    env.pop("LOCALCHAT_MODELS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300, env=env)
    architecture, parameters, modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert architecture.startswith("Qwen3 (") and "q/k norm" in architecture and parameters != "?"
    assert not {"torch", "transformers"} & set(modules)
