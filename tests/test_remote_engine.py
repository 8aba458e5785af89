"""The UI on a remote engine: RemoteEngineClient (localchat/api/remote.py) drives a second localchat
server started here through its OpenAI API, ChatService runs on it (messages in, replies saved
without token ids), the memory panel shows the server's /metrics, and the app in Chromium works
against it (send, regenerate, n = 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import skip_or_fail
from helpers.api_server import ServerThread, free_port
from helpers.tiny import tiny_engine
from localchat.api.remote import RemoteEngineClient, api_base, request_body
from localchat.api.remote_metrics import RemoteSnapshot, parse_metrics
from localchat.api.server import create_app
from localchat.bench.page import set_setting
from localchat.chat.service import ChatService
from localchat.chat.store import Store
from localchat.engine import EngineDriver, EngineStopped, RequestError, SamplingParams
from localchat.ui.remote_panel import render_remote_html

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path("/tmp/localchat_remote_engine.png")
KEY = "remote-test-key"
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
XSS = "<img src=x onerror=alert(1)>"


def blocks_used(engine) -> int:
    return engine.block_manager.figures().blocks_used


@pytest.fixture(scope="module")
def engine_server(smol_tokenizer):
    """A localchat API server (tiny engine) that asks for a key: the 'remote' engine."""
    driver = EngineDriver(tiny_engine(smol_tokenizer, seed=9, num_blocks=512, block_size=8))
    app = create_app(driver, api_key=KEY)
    with ServerThread(app) as srv:
        yield srv, driver
    app.state.api.close()
    driver.shutdown()


@pytest.fixture
def remote(engine_server):
    srv, _ = engine_server
    client = RemoteEngineClient(srv.url + "/v1", api_key=KEY)
    yield client
    client.shutdown()


# ------------------------------------------------------------------ pieces
def test_request_body_and_urls():
    body = request_body("m", [{"role": "user", "content": "hi"}], SamplingParams(temperature=0.5, max_tokens=7, n=2, top_k=5, seed=1))
    assert body["n"] == 2 and body["max_tokens"] == 7 and body["top_k"] == 5 and body["seed"] == 1 and body["stream"]
    assert body["stream_options"] == {"include_usage": True} and "min_p" not in body and "repetition_penalty" not in body
    with pytest.raises(RequestError, match="beam search"):
        request_body("m", [], SamplingParams(beam_width=2))
    assert api_base("http://h:8000/v1/") == api_base("http://h:8000") == "http://h:8000"
    with pytest.raises(ValueError, match="http"):
        api_base("h:8000")


VLLM_METRICS = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 400.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 100.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 4.0
vllm:time_to_first_token_seconds_count{model_name="m"} 4.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.8
"""


def test_vllm_metrics_become_panel_figures():
    snap = parse_metrics(VLLM_METRICS, "http://gpu:8000", "m")
    assert snap.server == "vLLM" and snap.error is None
    assert snap.values["kv_cache_usage"] == 0.25 and snap.values["prefix_cache_hit_rate"] == 0.25
    assert snap.values["requests_running"] == 3 and snap.values["requests_waiting"] == 1
    assert snap.values["ttft_mean_s"] == pytest.approx(0.2)
    html = render_remote_html(snap, title="KV cache")
    assert "KV cache usage" in html and "25.0%" in html and "200 ms" in html and "vLLM" in html
    assert "not available remotely" in html


def test_remote_panel_escapes_everything():
    snap = RemoteSnapshot(url=f"http://x/{XSS}", model=XSS, server="", values={}, families=2, error=XSS)
    html = render_remote_html(snap, title=XSS)
    assert "<img" not in html and html.count("&lt;img") == 5 and "not available remotely" in html


# ------------------------------------------------------------------ the client
def test_remote_client_answers_like_the_engine(remote, engine_server):
    _, driver = engine_server
    assert remote.info.model_name == "tiny" and not remote.info.accepts_token_ids and remote.info.max_model_len == 512
    messages = [{"role": "user", "content": "Hello there"}]
    updates = list(remote.submit(messages=messages, params=GREEDY.with_(n=2)))
    final = updates[-1]
    expected = driver.submit(messages=messages, params=GREEDY.with_(n=2)).result()
    assert final.finished and [o.text for o in final.outputs] == [o.text for o in expected.outputs]
    assert all(o.finish_reason == "length" for o in final.outputs)
    for o in final.outputs:  # the deltas add up to each sample's text
        assert "".join(u.outputs[o.index].delta_text for u in updates if len(u.outputs) > o.index) == o.text
    m = final.metrics
    assert m.num_prompt_tokens > 0 and m.time_to_first_token > 0
    assert m.num_generated_tokens == 0  # two choices: the server's usage does not say how many each
    with pytest.raises(RequestError, match="token ids"):
        remote.submit(prompt_token_ids=[1, 2, 3])
    with pytest.raises(RuntimeError, match="remote"):
        remote.call(blocks_used)


def test_remote_errors_and_abort(remote, engine_server):
    _, driver = engine_server
    with pytest.raises(RequestError, match="maximum context length"):
        remote.submit("owl " * 600, params=GREEDY).result()
    stream = remote.submit("Tell me a long story", params=SamplingParams(temperature=1, max_tokens=400, ignore_eos=True, n=2))
    first = next(iter(stream))
    assert not first.finished
    stream.abort()
    final = stream.result()
    assert final.finished and {o.finish_reason for o in final.outputs} == {"abort"}
    deadline = time.monotonic() + 30
    while driver.call(blocks_used) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.call(blocks_used) == 0  # the server saw the hang-up and freed the blocks


def test_remote_client_needs_a_reachable_server_and_the_key(engine_server):
    srv, _ = engine_server
    with pytest.raises(ValueError, match="401"):
        RemoteEngineClient(srv.url, api_key="wrong")
    with pytest.raises(ValueError, match="does not serve"):
        RemoteEngineClient(srv.url, api_key=KEY, model="other")
    with pytest.raises(EngineStopped, match="cannot reach"):
        RemoteEngineClient(f"http://127.0.0.1:{free_port()}")


def test_snapshot_reads_the_servers_metrics(remote):
    snap = remote.snapshot()
    assert snap.remote and snap.server == "localchat" and snap.error is None
    assert snap.values["blocks_total"] == 512 and "kv_cache_usage" in snap.values and "sharing_savings" in snap.values


def test_chat_service_on_a_remote_engine(remote, tmp_path):
    store = Store(tmp_path / "remote.db")
    try:
        service = ChatService(remote, store)
        conv = service.new_conversation("remote", system_prompt="You are terse.")
        final = list(service.send(conv.id, "Hello over there", GREEDY))[-1]
        assert len(final) == 1 and final[0].finished and final[0].text and final[0].generated_tokens == 10
        path = store.current_path(conv.id)
        assert [m.role for m in path] == ["user", "assistant"]
        assert not path[0].token_ids and not path[1].token_ids  # the server tokenizes: text only here
        assert path[1].content == final[0].text and path[1].finish_reason == "length"
        # regenerate with n = 2: two more siblings of the reply; then a second turn on the branch
        again = list(service.regenerate(path[1].id, GREEDY.with_(n=2, temperature=1.0, seed=4)))[-1]
        assert len(again) == 2 and store.siblings(path[1].id).count == 3
        second = list(service.send(conv.id, "And then?", GREEDY))[-1]
        assert second[0].finished and len(store.current_path(conv.id)) == 4
    finally:
        store.close()


# ------------------------------------------------------------------ the app in a browser
@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
def remote_app(engine_server, tmp_path):
    """`localchat app --engine-url` as a user starts it, pointed at the test's server."""
    srv, _ = engine_server
    port, db = free_port(), tmp_path / "app.db"
    env = {**os.environ, "LOCALCHAT_ENGINE_API_KEY": KEY, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "localchat", "app", "--engine-url", srv.url + "/v1", "--port", str(port),
                             "--db", str(db)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.3)
        yield url, db
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_browser_app_on_a_remote_engine(chromium, remote_app, engine_server):
    from playwright.sync_api import expect, sync_playwright

    url, db = remote_app
    srv, driver = engine_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            page.goto(url)
            assistants = page.locator("#lc-chat article.lc-assistant:not([hidden])")

            set_setting(page, "lc-temperature", "0")
            set_setting(page, "lc-max-tokens", "24")
            box = page.locator("#lc-input textarea")
            box.fill("Hello from the browser")
            box.press("Enter")
            expect(assistants).to_have_count(1)
            expect(assistants.first.locator(".lc-body")).not_to_be_empty()
            wait_saved(db, replies=1)

            set_setting(page, "lc-temperature", "1.0")
            page.locator("#lc-regenerate").click()
            expect(assistants.first.locator(".lc-pos")).to_have_text("2/2")
            wait_saved(db, replies=2)

            set_setting(page, "lc-n", "2")
            box.fill("Two answers, please")
            box.press("Enter")
            expect(assistants).to_have_count(2)
            expect(assistants.last.locator(".lc-pos")).to_have_text("1/2")
            wait_saved(db, replies=4)

            page.get_by_text("Memory (KV cache blocks)").click()
            page.locator("#lc-memory-refresh").click()
            memory = page.locator("#lc-memory")
            expect(memory).to_contain_text("not available remotely")
            expect(memory).to_contain_text("KV cache usage")
            expect(memory).to_contain_text(srv.url)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    with Store(db) as store:
        conv = store.list_conversations()[0]
        path = store.current_path(conv.id)
        assert [m.role for m in path] == ["user", "assistant", "user", "assistant"]
        assert store.siblings(path[1].id).count == 2 and store.siblings(path[3].id).count == 2
        assert all(not m.token_ids for m in path)
    assert driver.call(blocks_used) == 0


def wait_saved(db: Path, replies: int, timeout: float = 60) -> None:
    """Until the app's store holds `replies` finished assistant messages."""
    deadline = time.monotonic() + timeout
    while True:
        with Store(db) as store:
            conversations = store.list_conversations()
            done = sum(1 for c in conversations for m in store.list_messages(c.id)
                       if m.role == "assistant" and m.finish_reason not in (None, "streaming"))
        if done >= replies:
            return
        assert time.monotonic() < deadline, f"{done} of {replies} replies saved"
        time.sleep(0.2)
