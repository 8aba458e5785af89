"""Hub downloads without a network: a Hub on 127.0.0.1 (tests/helpers/fake_hub.py) holding a tiny model.

`localchat models download` shows huggingface_hub's progress and fetches only the files a model needs;
the model then runs (the same ids as transformers), also offline; HF_HUB_OFFLINE with a model that is
not here, a gated repository, a missing repository or file, no network and a full disk are one clear
line each; a transfer cut mid-file resumes where it stopped, and finished files survive a failed run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.archs import reference_greedy, save_tiny_model, tiny_hf_model
from helpers.fake_hub import FakeHub
from helpers.gguf_files import small_tokenizer

from localchat.model import hub, resolve_model

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/tiny-qwen2-chat"

REGISTRY = f"""
default: tiny-hub
models:
  tiny-hub:
    source: hub
    repo_id: {REPO}
    revision: main
    context_length: 256
    architecture: qwen2
    parameters: 0.3M
  tiny-gated:
    source: hub
    repo_id: tiny-org/gated
  tiny-missing:
    source: hub
    repo_id: tiny-org/not-there
  tiny-no-file:
    source: hub
    repo_id: {REPO}
    gguf_file: not-there.Q4_K_M.gguf
  tiny-gguf:
    source: hub
    repo_id: tiny-org/tiny-gguf
    gguf_file: tiny-llama.F32.gguf
"""


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A Hub repository's files: a tiny Qwen2 in safetensors with its tokenizer, plus files it doesn't need."""
    directory = tmp_path_factory.mktemp("tiny-repo")
    tokenizer = small_tokenizer(tmp_path_factory.mktemp("tok"))
    hf = tiny_hf_model("qwen2", len(tokenizer), seed=3, max_position_embeddings=256)
    save_tiny_model(hf, tokenizer, directory)
    (directory / "consolidated.safetensors").write_bytes(b"\0" * 4096)  # a duplicate export: never fetched
    (directory / "README.md").write_text("# tiny\n")
    return directory, hf, tokenizer


@pytest.fixture
def fake_hub(tiny_repo, tmp_path, monkeypatch):
    directory, _, _ = tiny_repo
    server = FakeHub()
    server.add_directory(REPO, directory)
    server.add_directory("tiny-org/gated", directory, gated=True)
    server.start()
    registry = tmp_path / "models.yaml"
    registry.write_text(REGISTRY)
    env = {
        "HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "LOCALCHAT_MODELS": str(registry),
        "LOCALCHAT_CACHE": str(tmp_path / "lc"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "LOCALCHAT_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(key, raising=False)
    yield server
    server.stop()


def localchat(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real command line, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "localchat", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command line in this process (the environment is read at each call, so monkeypatch applies)."""
    from localchat.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_models_download_shows_progress_fetches_only_what_is_needed_and_runs(fake_hub, tiny_repo):
    _, hf, tokenizer = tiny_repo
    listed = json.loads(localchat("models", "list", "--json").stdout)
    before = {e["name"]: e for e in listed}["tiny-hub"]
    assert (before["downloaded"], before["size_bytes"], before["architecture"]) == (False, 0, "Qwen2")

    proc = localchat("models", "download", "tiny-hub")
    assert proc.returncode == 0, proc.stderr
    assert "100%" in proc.stderr and "Fetching" in proc.stderr  # huggingface_hub's own progress bars
    assert "tiny-hub" in proc.stdout
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in fake_hub.log if method == "GET" and "/resolve/" in path}
    assert fetched == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json", "chat_template.jinja"}

    after = {e["name"]: e for e in json.loads(localchat("models", "list", "--json").stdout)}["tiny-hub"]
    assert after["downloaded"] and after["size_bytes"] > 100_000
    assert after["architecture"].startswith("Qwen2 (") and "qkv bias" in after["architecture"]

    fake_hub.stop()  # from here on there is no Hub at all: the model runs from the cache
    proc = localchat("generate", "--model", "tiny-hub", "--dtype", "float32", "--temperature", "0", "--max-tokens", "8",
                     "--ignore-eos", "--json", "Hello there")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "tiny-hub"
    assert out["outputs"][0]["token_ids"] == reference_greedy(hf, out["prompt_token_ids"], 8)
    assert out["prompt_token_ids"][:3] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True)["input_ids"][:3]


def test_offline_and_missing_model_is_a_clear_error(fake_hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args in (("models", "download", "tiny-hub"), ("generate", "--model", "tiny-hub", "Hi")):
        proc = run_cli(capsys, *args)
        assert proc.returncode == 2, proc.stderr
        assert "HF_HUB_OFFLINE" in proc.stderr and "localchat models download tiny-hub" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not [entry for entry in fake_hub.log if "/resolve/" in entry[1]]  # offline: nothing was asked


def test_cut_transfer_resumes_with_a_range_request(fake_hub, tiny_repo, monkeypatch):
    from huggingface_hub import constants

    directory, _, _ = tiny_repo
    # huggingface_hub counts what it has written in 10 MB chunks; real weights are many chunks, this
    # tiny file is one, so chunks are made small enough for the cut to land after some were written.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    size = (directory / "model.safetensors").stat().st_size
    cut = 6 * 64 * 1024
    fake_hub.cut_once["model.safetensors"] = cut
    snapshot = hub.download(resolve_model("tiny-hub"))
    assert size > 2 * cut and fake_hub.fetched("model.safetensors") == [None, f"bytes={cut}-"]
    assert (snapshot / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()


def test_a_failed_download_keeps_finished_files_and_the_next_run_fetches_only_the_rest(fake_hub):
    spec = resolve_model("tiny-hub")
    fake_hub.fail["model.safetensors"] = 503  # the weights fail; everything else arrives
    with pytest.raises(hub.DownloadError, match=r"cannot download model 'tiny-hub': the Hub answered with an error"):
        hub.download(spec)
    assert hub.local_snapshot(spec) is None  # incomplete: never used for loading

    del fake_hub.fail["model.safetensors"]
    fake_hub.log.clear()
    snapshot = hub.download(spec)
    again = {p.rsplit("/", 1)[-1] for m, p, _ in fake_hub.log if m == "GET" and "/resolve/" in p}
    assert again == {"model.safetensors"}  # config, tokenizer and template were kept from the first run
    assert hub.complete(snapshot, spec)


@pytest.mark.parametrize(
    "name, message",
    [
        ("tiny-gated", r"tiny-org/gated is a gated repository: accept its terms at http://127\.0\.0\.1:\d+/tiny-org/gated .*set HF_TOKEN"),
        ("tiny-missing", r"tiny-org/not-there does not exist on http://127\.0\.0\.1:\d+ \(or is private: set HF_TOKEN"),
        ("tiny-no-file", r"tiny-org/tiny-qwen2-chat has no file 'not-there\.Q4_K_M\.gguf'"),
    ],
)
def test_hub_refusals_are_clear(fake_hub, capsys, name, message):
    proc = run_cli(capsys, "models", "download", name)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: cannot download model '{name}': ")
    import re

    assert re.search(message, proc.stderr), proc.stderr


def test_hf_token_opens_a_gated_repository(fake_hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    proc = run_cli(capsys, "models", "download", "tiny-gated")
    assert proc.returncode == 0, proc.stderr
    assert any(m == "GET" and "/tiny-org/gated/resolve/" in p for m, p, _ in fake_hub.log)


def test_no_network_is_a_clear_error(fake_hub, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    proc = run_cli(capsys, "models", "download", "tiny-hub")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"could not reach http://127.0.0.1:{closed_port}" in proc.stderr and "check the network" in proc.stderr


def test_too_little_disk_space_is_refused_before_downloading(fake_hub, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(hub.DownloadError, match=r"it needs 0\.00 GiB but only 0\.00 GiB is free in .*HF_HUB_CACHE"):
        hub.download(resolve_model("tiny-hub"))
    assert not [entry for entry in fake_hub.log if entry[0] == "GET" and "/resolve/" in entry[1]]


def test_models_remove_frees_the_files(fake_hub, capsys):
    assert run_cli(capsys, "models", "download", "tiny-hub").returncode == 0
    proc = run_cli(capsys, "models", "remove", "tiny-hub")
    assert proc.returncode == 0 and "freed" in proc.stdout
    assert hub.local_snapshot(resolve_model("tiny-hub")) is None
    assert not (Path(os.environ["HF_HUB_CACHE"]) / "models--tiny-org--tiny-qwen2-chat").exists()
    proc = run_cli(capsys, "models", "remove", "no-such-model")
    assert proc.returncode == 2 and "unknown model 'no-such-model'" in proc.stderr


def test_a_gguf_from_the_hub_downloads_only_that_file_and_runs(fake_hub, tmp_path, capsys):
    """A GGUF repository holds many quantizations: only the entry's file is fetched; it carries its own
    tokenizer and chat template, and is converted once."""
    from helpers.gguf_files import write_gguf

    from localchat.engine import Engine, EngineConfig, SamplingParams
    from localchat.model import load_model

    hf = tiny_hf_model("llama", 2048, seed=8)
    repo = tmp_path / "gguf-repo"
    repo.mkdir()
    write_gguf(hf, repo / "tiny-llama.F32.gguf")
    (repo / "tiny-llama.Q2_K.gguf").write_bytes(b"GGUF" + b"\0" * 4096)  # another quantization: never fetched
    fake_hub.add_directory("tiny-org/tiny-gguf", repo)
    assert run_cli(capsys, "models", "download", "tiny-gguf").returncode == 0
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in fake_hub.log if m == "GET" and "/tiny-gguf/resolve/" in p}
    assert fetched == {"tiny-llama.F32.gguf"}
    loaded = load_model("tiny-gguf", dtype="float32", device="cpu")
    assert loaded.converted and "<|im_start|>" in loaded.tokenizer.chat_template
    engine = Engine.from_loaded(loaded, EngineConfig(block_size=16, num_blocks=64))
    prompt = [5, 9, 200, 31, 7]
    out = engine.generate(prompt_token_ids=[prompt], params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out[0].outputs[0].token_ids == reference_greedy(hf, prompt, 8)
