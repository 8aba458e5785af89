"""What each process imports as it starts: the app's start-up is two processes on two cores (the page's and the
engine's), and every module one of them imports for nothing delays the first page (benchmarks/NOTES.md,
session 11). Each check runs in a fresh interpreter, so what earlier tests imported does not count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_command_line_imports_neither_torch_nor_the_store_database_layer():
    # Every command's parser is built before the command runs, in the page's process and in the engine's.
    modules = imported_after("import localchat.cli; localchat.cli.build_parser()")
    assert not {"torch", "transformers", "sqlite_utils", "pandas", "gradio"} & modules


def test_the_store_package_loads_sqlite_utils_only_for_the_store_itself():
    modules = imported_after("from localchat.chat.store import StoreError, default_db_path")
    assert "sqlite_utils" not in modules
    modules = imported_after("from localchat.chat.store import Store")
    assert "sqlite_utils" in modules


def test_the_model_code_does_not_import_transformers_activations_for_silu():
    modules = imported_after("import localchat.model.loader")
    assert "localchat.model.llama" in modules
    assert "transformers.activations" not in modules


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "silu"])
def test_a_non_silu_activation_still_comes_from_transformers(act):
    import torch
    from transformers import LlamaConfig
    from transformers.activations import ACT2FN

    from localchat.model.llama import LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=1, vocab_size=32, hidden_act=act)
    layer = LlamaForCausalLM(config, dtype=torch.float32).layers[0]
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(layer.act(x), ACT2FN[act](x))


def test_gradio_does_not_rewrite_its_type_stubs_as_the_page_imports_it():
    code = ("import localchat.ui.app\n"
            "import gradio, gradio.component_meta as meta\n"
            "assert meta.create_or_modify_pyi.__module__ == 'localchat.ui.gradio_stubs', meta.create_or_modify_pyi\n"
            "with gradio.Blocks() as demo:\n"
            "    gradio.Textbox(label='still builds')\n")
    assert "gradio.component_meta" in imported_after(code)


def test_the_stub_pass_is_skipped_even_when_gradio_was_imported_first():
    code = ("import gradio, gradio.component_meta as meta\n"
            "original = meta.create_or_modify_pyi\n"
            "import localchat.ui\n"
            "assert meta.create_or_modify_pyi is not original\n")
    imported_after(code)
