"""Switching models under a running chat (localchat/chat/engine_switch.py) and the memory check before loading.

In-process engines (EngineDriver) on tiny models of two architectures keep these fast; the browser
test at the end runs the real app (`localchat app`, engine processes) and switches through the page.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
from helpers.archs import reference_greedy, tiny_hf_model
from helpers.gguf_files import small_tokenizer

from localchat.chat.engine_switch import ModelSwitcher, SwitchableEngine
from localchat.chat.service import ChatService
from localchat.chat.store import Store
from localchat.engine import (
    Engine,
    EngineConfig,
    EngineDriver,
    EngineStopped,
    SamplingParams,
)
from localchat.model.chat_template import prompt_ids
from localchat.model.llama import LlamaForCausalLM
from localchat.bench.page import set_setting
from localchat.model.loader import LoadedModel
from localchat.model.memory import InsufficientMemoryError, estimate

pytestmark = pytest.mark.browser

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny chat models (a Llama and a Qwen3) with a small tokenizer, and their transformers references."""
    tokenizer = small_tokenizer(tmp_path_factory.mktemp("tok"))
    out = {}
    for name, arch, seed in (("tiny-llama", "llama", 1), ("tiny-qwen3", "qwen3", 2)):
        hf = tiny_hf_model(arch, len(tokenizer), seed=seed)
        model = LlamaForCausalLM(hf.config)
        model.load_hf_state_dict(hf.state_dict())
        out[name] = (LoadedModel(name=name, config=hf.config, tokenizer=tokenizer, model=model, dtype=torch.float32,
                                 device=torch.device("cpu"), eos_token_ids=[2]), hf)
    return out


def start_engine(models, num_blocks: dict | None = None):
    def start(name: str) -> EngineDriver:
        if name not in models:
            raise ValueError(f"unknown model {name!r}")
        blocks = (num_blocks or {}).get(name, 128)
        return EngineDriver(Engine.from_loaded(models[name][0], EngineConfig(block_size=8, num_blocks=blocks)))
    return start


@pytest.fixture
def app(models, tmp_path):
    """(service, switcher, start) over tiny-llama, as the app wires them."""
    start = start_engine(models, {"tiny-llama": 96, "tiny-qwen3": 160})
    engine = SwitchableEngine(start("tiny-llama"))
    store = Store(tmp_path / "chats.db")
    service = ChatService(engine, store)
    yield service, ModelSwitcher(engine, start), start
    engine.shutdown()
    store.close()


def reply(service, conv_id, text) -> list:
    events = []
    for update in service.send(conv_id, text, GREEDY):
        events = update
    return events


def test_switch_keeps_the_conversation_and_records_who_wrote_each_reply(app, models):
    service, switcher, _ = app
    old_client = service.driver.current
    conv = service.new_conversation("two models")
    reply(service, conv.id, "Hello")
    assert service.driver.snapshot().figures.blocks_total == 96

    status = switcher.switch("tiny-qwen3")
    assert status.phase == "ready" and service.info.model_name == "tiny-qwen3"
    assert old_client.stopped  # the old engine was shut down: its memory goes back
    assert service.driver.snapshot().figures.blocks_total == 160  # the memory panel follows the new pool

    reply(service, conv.id, "And now?")
    path = service.store.current_path(conv.id)
    assert [m.model for m in path if m.role == "assistant"] == ["tiny-llama", "tiny-qwen3"]
    # The old reply's ids are tiny-llama's: the new model's prompt is rendered from the text instead.
    assert path[2].token_ids is None
    messages = [{"role": m.role, "content": m.content} for m in path[:3]]
    prompt = prompt_ids(service.tokenizer, messages)
    assert path[3].token_ids == reference_greedy(models["tiny-qwen3"][1], prompt, GREEDY.max_tokens)

    switcher.switch("tiny-llama")  # and back: the same conversation goes on
    reply(service, conv.id, "Back again")
    assert [m.model for m in service.store.current_path(conv.id) if m.role == "assistant"] == \
        ["tiny-llama", "tiny-qwen3", "tiny-llama"]


def test_a_reply_streaming_during_the_switch_finishes_on_the_old_model(app):
    service, switcher, _ = app
    conv = service.new_conversation()
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    stream = service.send(conv.id, "Tell me a long story", long)
    first = next(stream)  # the reply is running on tiny-llama
    done = threading.Event()
    threading.Thread(target=lambda: (switcher.switch("tiny-qwen3"), done.set()), daemon=True).start()
    rest = list(stream)
    final = (rest or [first])[-1][0]
    assert final.finished and final.generated_tokens == 200  # not cut by the switch
    assert done.wait(60)
    saved = service.store.get_message(final.message_id)
    assert saved.model == "tiny-llama" and len(saved.token_ids) == 200


def test_a_failed_switch_keeps_the_old_model_serving(app):
    service, switcher, _ = app
    status = switcher.switch("no-such-model")
    assert status.phase == "failed" and "unknown model 'no-such-model'" in status.message
    assert service.info.model_name == "tiny-llama"
    conv = service.new_conversation()
    assert reply(service, conv.id, "still here?")[0].finished


def test_replace_order_releases_the_old_engine_first_and_restores_it_on_failure(models, tmp_path):
    started = []
    base = start_engine(models)

    def start(name):
        started.append(name)
        if name == "tiny-qwen3":
            raise RuntimeError("out of memory while loading")
        return base(name)

    engine = SwitchableEngine(base("tiny-llama"))
    first = engine.current
    switcher = ModelSwitcher(engine, start, plan=lambda new, current: "replace")
    status = switcher.switch("tiny-qwen3")
    assert status.phase == "failed" and "out of memory" in status.message
    assert started == ["tiny-qwen3", "tiny-llama"]  # tried the new one, then brought the old one back
    assert first.stopped and engine.current is not first and not engine.stopped
    assert engine.info.model_name == "tiny-llama"
    engine.shutdown()
    with pytest.raises(EngineStopped):
        engine.submit(prompt_token_ids=[5, 6, 7])


def test_a_template_that_rewrites_history_renders_the_next_prompt_from_text(models, tmp_path):
    """Qwen3's template drops an older reply's <think> block once a new user turn follows, so the history
    is no longer a prefix of the next prompt: the next turn is rendered from the text, not refused. (The
    tiny model writes no <think> block, so this template shortens every older reply instead.)"""
    import copy

    loaded = copy.copy(models["tiny-qwen3"][0])
    loaded.tokenizer = copy.deepcopy(loaded.tokenizer)
    loaded.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(an earlier reply, shortened)"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think></think>{% endif %}")
    engine = SwitchableEngine(EngineDriver(Engine.from_loaded(loaded, EngineConfig(block_size=8, num_blocks=128))))
    store = Store(tmp_path / "chats.db")
    try:
        service = ChatService(engine, store)
        conv = service.new_conversation()
        reply(service, conv.id, "First question")
        events = reply(service, conv.id, "Second question")
        assert events[0].finished
        path = store.current_path(conv.id)
        assert path[2].token_ids is None and path[3].model == "tiny-qwen3"
    finally:
        engine.shutdown()
        store.close()


# ---- memory ------------------------------------------------------------------------------------


def test_memory_estimate_counts_weights_and_kv(models):
    loaded, hf = models["tiny-qwen3"]
    params = sum(p.numel() for p in hf.parameters())
    est = estimate(loaded.config, torch.bfloat16, "cpu", 3 * 2**20, available=2**40)
    assert est.parameters == params and est.weights_bytes == 2 * params and est.kv_cache_bytes == 3 * 2**20
    assert est.fits
    tight = estimate(loaded.config, torch.float32, "cpu", 2**30, available=2**29, name="tiny-qwen3")
    with pytest.raises(InsufficientMemoryError, match=r"not enough memory: tiny-qwen3 needs ~1\.50 GiB on cpu .*KV cache 1\.00 GiB.*only 0\.50 GiB is free"):
        tight.check()


def test_build_engine_refuses_what_does_not_fit(monkeypatch):
    from localchat.cli.common import build_engine
    from localchat.model import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 300 * 2**20)
    with pytest.raises(InsufficientMemoryError, match=r"smollm2-135m-instruct needs ~.* but only 0\.29 GiB is free"):
        build_engine(None, "float32", "cpu", None, {"block_size": 16, "kv_cache_gb": 0.5})


def test_swap_order_alongside_replace_or_refuse():
    from localchat.model.memory import MemoryEstimate, swap_order

    def est(weights, free):
        return MemoryEstimate("m", "cpu", 1, weights, 0, 0, free)

    gib = 2**30
    assert swap_order(est(2 * gib, 8 * gib), None) == "alongside"
    assert swap_order(est(2 * gib, 1 * gib), est(3 * gib, None)) == "replace"  # fits once the old is gone
    with pytest.raises(InsufficientMemoryError, match=r"needs ~2\.50 GiB .* but only 1\.50 GiB is free"):
        swap_order(est(2 * gib, gib // 2), est(gib // 2, None))  # even then 1.5 GiB < 2.5 GiB


def test_swap_plan_reads_the_models_and_the_machine(monkeypatch):
    from localchat.cli.common import swap_plan
    from localchat.model import memory

    spec = {"model": None, "dtype": "float32", "device": "cpu", "threads": None,
            "config": {"block_size": 16, "kv_cache_gb": 0.25}}
    need = estimate(_default_config(), torch.float32, "cpu", int(0.25 * 2**30), available=0).needed_bytes
    for free, expected in ((3 * need, "alongside"), (need // 2, "replace")):
        monkeypatch.setattr(memory, "available_memory", lambda device, free=free: free)
        assert swap_plan(spec, "smollm2-135m-instruct", "smollm2-135m-instruct") == expected


def _default_config():
    from localchat.model import resolve_model
    from localchat.model.loader import model_config

    return model_config(resolve_model(None))


def test_switching_to_a_hub_model_downloads_it_with_progress(tmp_path, monkeypatch, models):
    """The picker's path: a Hub model that is not here is downloaded (progress in the status), then runs."""
    from helpers.archs import save_tiny_model
    from helpers.fake_hub import FakeHub

    from localchat.model import load_model

    _, hf = models["tiny-qwen3"]
    tokenizer = models["tiny-qwen3"][0].tokenizer
    save_tiny_model(hf, tokenizer, tmp_path / "repo")
    server = FakeHub()
    server.add_directory("tiny-org/qwen3", tmp_path / "repo")
    server.slow["model.safetensors"] = 0.05
    server.start()
    registry = tmp_path / "models.yaml"
    registry.write_text("default: tiny-hub\nmodels:\n  tiny-hub:\n    source: hub\n    repo_id: tiny-org/qwen3\n")
    for key, value in {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "LOCALCHAT_MODELS": str(registry),
                       "LOCALCHAT_CACHE": str(tmp_path / "lc"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def start(name):
        if name in models:
            return start_engine(models)(name)
        return EngineDriver(Engine.from_loaded(load_model(name, "float32", "cpu"), EngineConfig(block_size=8, num_blocks=64)))

    from localchat.chat.engine_switch import SwitchStatus

    phases: list[str] = []  # every phase the switch passes, however briefly (a poll can miss a short one)
    record = SwitchStatus.__setattr__

    def recording(self, name, value):
        if name == "phase":
            phases.append(value)
        record(self, name, value)

    monkeypatch.setattr(SwitchStatus, "__setattr__", recording)
    engine = SwitchableEngine(start("tiny-llama"))
    switcher = ModelSwitcher(engine, start)
    try:
        status = switcher.begin("tiny-hub")
        seen = []
        while not status.done.wait(0.02):
            seen.append((status.phase, status.done_bytes, status.total_bytes))
        assert status.phase == "ready", status.message
        size = (tmp_path / "repo" / "model.safetensors").stat().st_size
        downloading = [s for s in seen if s[0] == "downloading" and 0 < s[1] < s[2]]
        assert downloading and downloading[-1][2] >= size  # partial progress was visible while it ran
        assert phases.index("downloading") < phases.index("loading") < phases.index("ready"), phases
        assert engine.info.model_name == "tiny-hub"
        out = engine.submit(prompt_token_ids=[5, 6, 7, 8], params=GREEDY).result()
        assert out.outputs[0].token_ids == reference_greedy(hf, [5, 6, 7, 8], GREEDY.max_tokens)
    finally:
        engine.shutdown()
        server.stop()


# ---- the app in a browser ----------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def two_model_app(models, tmp_path):
    """`localchat app` as a user starts it on a local tiny model, with a second tiny model on a Hub of ours
    (127.0.0.1) that is not downloaded yet; its engine runs in a process of its own, as always."""
    import os
    import subprocess
    import sys
    import time

    import httpx
    from helpers.api_server import free_port
    from helpers.archs import save_tiny_model
    from helpers.fake_hub import FakeHub

    tokenizer = models["tiny-llama"][0].tokenizer
    save_tiny_model(models["tiny-llama"][1], tokenizer, tmp_path / "tiny-a")
    save_tiny_model(models["tiny-qwen3"][1], tokenizer, tmp_path / "repo")
    server = FakeHub()
    server.add_directory("tiny-org/tiny-b", tmp_path / "repo")
    server.slow["model.safetensors"] = 0.15  # a few seconds: the page shows the download going
    server.start()
    registry = tmp_path / "models.yaml"
    registry.write_text(f"default: tiny-a\nmodels:\n  tiny-a:\n    source: local\n    path: {tmp_path / 'tiny-a'}\n"
                        "  tiny-b:\n    source: hub\n    repo_id: tiny-org/tiny-b\n    description: a tiny Qwen3\n")
    port, db = free_port(), tmp_path / "app.db"
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "LOCALCHAT_MODELS": str(registry),
           "LOCALCHAT_CACHE": str(tmp_path / "lc"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.Popen([sys.executable, "-m", "localchat", "app", "--port", str(port), "--db", str(db), "--no-api",
                             "--dtype", "float32", "--kv-cache-gb", "0.02"],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.3)
        yield url, db, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.stop()


def engine_processes(pid: int) -> int:
    """The app's live engine processes (multiprocessing's spawned children, not its resource tracker)."""
    import psutil

    count = 0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd and child.status() != psutil.STATUS_ZOMBIE:
            count += 1
    return count


def assistant_models(db: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT model FROM messages WHERE role = 'assistant' ORDER BY id")]


def test_browser_pick_another_model_chat_and_switch_back(two_model_app):
    if not Path(CHROMIUM).exists():
        from conftest import skip_or_fail

        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    url, db, proc = two_model_app
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            page.goto(url)
            assistants = page.locator("#lc-chat article.lc-assistant:not([hidden])")
            status = page.locator("#lc-model-status")

            def pick(name: str) -> None:
                page.locator("#lc-model input").click()
                page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} ·")).click()
                page.locator("#lc-model-use").click()

            def chat(text: str, count: int, model: str) -> None:
                page.locator("#lc-input textarea").fill(text)
                page.locator("#lc-send").click()
                expect(assistants).to_have_count(count)
                expect(assistants.nth(count - 1).locator(".lc-body")).not_to_be_empty()
                # Once saved, the reply's line names the model that wrote it.
                expect(assistants.nth(count - 1)).to_contain_text(f"{model} · stopped at the token limit")

            page.get_by_text("Settings", exact=True).click()
            expect(page.locator("#lc-model input")).to_have_value(re.compile(r"^tiny-a · Llama"))
            for elem_id, value in (("lc-temperature", "0"), ("lc-max-tokens", "12")):
                set_setting(page, elem_id, value)
            chat("Hello, who are you?", 1, "tiny-a")

            pick("tiny-b")  # not downloaded: the page shows the download, then the switch
            expect(status).to_contain_text(re.compile(r"Downloading tiny-b: [\d.]+ (KB|MB) of [\d.]+ (KB|MB) \(\d+%\)"))
            page.screenshot(path=str(ARTIFACTS / "model_switch_downloading.png"), full_page=True)
            expect(status).to_contain_text("Switched: now running tiny-b")
            expect(page.locator("#lc-model input")).to_have_value(re.compile(r"^tiny-b · Qwen3 .*downloaded"))
            chat("And you, new model?", 2, "tiny-b")
            expect(assistants.nth(0)).to_contain_text("tiny-a")  # the conversation stayed, with who wrote what
            page.get_by_text("Memory (KV cache blocks)").click()
            page.locator("#lc-memory-refresh").click()
            expect(page.locator("#lc-memory")).to_contain_text("tiny-b")
            page.screenshot(path=str(ARTIFACTS / "model_switch.png"), full_page=True)

            pick("tiny-a")  # and back, in the same conversation
            expect(status).to_contain_text("Switched: now running tiny-a")
            chat("Back to the first one", 3, "tiny-a")
            expect(page.locator("#lc-memory")).to_contain_text("tiny-a")
        finally:
            browser.close()
    assert assistant_models(db)[-3:] == ["tiny-a", "tiny-b", "tiny-a"]
    assert engine_processes(proc.pid) == 1  # each old engine process was shut down
