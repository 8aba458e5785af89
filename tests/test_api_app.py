"""The API beside the page (`localchat app`): same port, same engine client, so API traffic shares the
prefix cache and the memory panel with the UI; and who may listen where (localchat/api/security.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from helpers.api_server import free_port
from localchat.api.security import exposure, is_loopback, port_problem, resolve_api_key
from localchat.api.server import ApiServer
from localchat.cli.app import _api_routes, _page_auth
from localchat.engine import SamplingParams

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.*")
ROOT = Path(__file__).resolve().parents[1]


def figures(engine) -> dict:
    return engine.block_manager.figures().as_dict()


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


@pytest.fixture
def app_with_api(chat_service):
    from localchat.ui.app import build_ui, launch

    service = chat_service(num_blocks=256, block_size=8)
    api = ApiServer(service.driver)
    demo = build_ui(service)
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True, routes=api.router().routes)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        demo.close()
        api.close()


def test_the_page_and_the_api_share_one_port_and_one_engine(app_with_api):
    url, service = app_with_api
    assert httpx.get(url + "/").status_code == 200 and "<html" in httpx.get(url + "/").text.lower()
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oa.models.list().data] == ["tiny"]

    # A conversation in the page's service, then the same conversation through the API: the API's
    # prompt hits the blocks the page's reply left in the prefix cache.
    conv = service.new_conversation(system_prompt="You are a patient guide to the birds of the northern forests. " * 3)
    reply = list(service.send(conv.id, "Which owls live here?", SamplingParams(temperature=0, max_tokens=8)))[-1][0]
    ttft_before = metric(url, "localchat:time_to_first_token_seconds_count")
    assert ttft_before >= 1  # the page's request was seen by the same metrics
    path = service.store.current_path(conv.id)
    messages = [{"role": "system", "content": service.store.get_conversation(conv.id).system_prompt},
                {"role": "user", "content": path[0].content}, {"role": "assistant", "content": reply.text},
                {"role": "user", "content": "And hawks?"}]
    r = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= 5 * 8
    assert metric(url, "localchat:time_to_first_token_seconds_count") == ttft_before + 1

    # While an API reply streams, the page's memory snapshot shows its sequences and blocks.
    stream = oa.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=300, temperature=1,
                                        stream=True, extra_body={"ignore_eos": True})
    seen = set()
    for chunk in stream:
        seen.update(c.index for c in chunk.choices)
        if seen == {0, 1}:
            snap = service.driver.snapshot()
            assert len(snap.tables) == 2 and snap.figures.blocks_used > 0
            break
    stream.close()


def test_api_requests_run_beside_page_requests(app_with_api):
    url, service = app_with_api
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    conv = service.new_conversation()
    page_reply = []
    page = threading.Thread(target=lambda: page_reply.append(list(service.send(conv.id, "Hello", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))[-1]))
    page.start()
    api_reply = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
                                           extra_body={"ignore_eos": True})
    page.join(timeout=120)
    assert api_reply.usage.completion_tokens == 40 and page_reply[0][0].generated_tokens == 40
    assert service.driver.call(figures)["blocks_used"] == 0


def test_no_api_and_remote_engines_serve_no_routes(chat_service):
    service = chat_service(num_blocks=64, block_size=8)
    args = argparse.Namespace(no_api=True)
    assert _api_routes(args, service.driver, None) == []
    args.no_api = False
    paths = {r.path for r in _api_routes(args, service.driver, None)}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics", "/health"} <= paths


# ------------------------------------------------------------------ where it listens
@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
                                            ("0.0.0.0", False), ("192.168.1.4", False), ("::", False), ("example.org", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_exposure_needs_a_key_or_an_explicit_flag():
    assert exposure("127.0.0.1", None, False) == (None, None)
    problem, warning = exposure("0.0.0.0", None, False)
    assert "refusing" in problem and "--api-key" in problem and warning is None
    problem, warning = exposure("0.0.0.0", "k", False)
    assert problem is None and "warning" in warning and "key" in warning
    problem, warning = exposure("0.0.0.0", None, True)
    assert problem is None and "ANYONE" in warning
    assert "share link" in exposure("127.0.0.1", None, False, share=True)[0]


def test_api_key_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("LOCALCHAT_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("flag") == "flag"
    monkeypatch.setenv("LOCALCHAT_API_KEY", "  ")
    assert resolve_api_key(None) is None
    auth = _page_auth("secret")
    assert auth("anyone", "secret") and not auth("anyone", "wrong") and _page_auth(None) is None


def test_a_busy_port_is_found_before_the_model_loads():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert "is another server using the port" in port_problem("127.0.0.1", s.getsockname()[1])
    assert port_problem("127.0.0.1", 70000).startswith("--port")


@pytest.mark.parametrize("argv, message", [
    (["serve", "--host", "0.0.0.0"], "without an API key"),
    (["app", "--host", "0.0.0.0"], "without an API key"),
    (["app", "--share"], "public share link"),
    (["serve", "--port", "0"], "--port"),
    (["app", "--engine-url", "ftp://x"], "http://"),
])
def test_cli_refuses_clearly(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "localchat", *argv, "--db", str(tmp_path / "x.db")] if argv[0] == "app"
                          else [sys.executable, "-m", "localchat", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_app_on_an_unreachable_engine_url_is_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = subprocess.run([sys.executable, "-m", "localchat", "app", "--engine-url", url, "--db", str(tmp_path / "x.db")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cannot reach the engine server" in proc.stderr and "Traceback" not in proc.stderr
