"""Nothing is fetched from the internet at run time: the real `localchat app` (a model already on disk)
serves the page and the API, a reply is written in Chromium, and neither the browser nor any of the
app's processes asks for another host (no fonts, no CDN scripts, no analytics, no update checks).
The app's processes run with helpers/netguard/sitecustomize.py, which logs and refuses any connection
or name lookup beyond this machine; the browser's requests are recorded. Listening beyond 127.0.0.1
needs an explicit flag and prints a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import skip_or_fail
from helpers.tiny_app import HERE, AppProcess, save_tiny_model

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def test_the_app_asks_no_other_host(tiny_model, tmp_path):
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    log = tmp_path / "network.log"
    env = {"PYTHONPATH": os.pathsep.join([str(HERE / "netguard"), os.environ.get("PYTHONPATH", "")]),
           "LOCALCHAT_NET_LOG": str(log)}
    app = AppProcess(["app", "--model", str(tiny_model), "--db", str(tmp_path / "chats.db"), "--kv-cache-gb", "0.05"],
                     tmp_path, env=env)
    foreign: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(90_000)
            page.on("request", lambda r: None if r.url.startswith((app.url, "data:", "blob:")) else foreign.append(r.url))
            response = page.goto(app.url)
            assert "default-src 'self'" in response.headers.get("content-security-policy", "")
            page.locator('#lc-chat .lc-conv:not([data-ctx="0"])').wait_for(state="attached")
            page.locator("#lc-input textarea").fill("Hello there")
            page.locator("#lc-send").click()
            page.wait_for_function("() => document.querySelectorAll('#lc-chat .lc-msg.lc-assistant').length >= 1"
                                   " && !document.querySelector('#lc-live .lc-live')")
            page.locator("#lc-memory-acc").get_by_text("Memory", exact=False).first.click()
            page.locator("#lc-memory canvas").first.wait_for()
            browser.close()
        reply = httpx.post(app.url + "v1/chat/completions", timeout=120,
                           json={"model": str(tiny_model), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert httpx.get(app.url + "metrics", timeout=30).status_code == 200
    finally:
        assert app.stop() == 0
    lines = log.read_text().splitlines() if log.exists() else []
    assert foreign == []  # the browser: nothing from another host
    assert [line for line in lines if " local " not in line] == []  # the app's processes: nothing either
    assert any(" local " in line for line in lines)  # the guard was there (the app checks its own URL)


@pytest.mark.parametrize("command", ["app", "serve"])
def test_listening_beyond_this_machine_needs_a_flag_and_warns(tiny_model, tmp_path, command):
    refused = subprocess.run([sys.executable, "-m", "localchat", command, "--host", "0.0.0.0", "--model", str(tiny_model),
                              "--db", str(tmp_path / "c.db")] if command == "app" else
                             [sys.executable, "-m", "localchat", command, "--host", "0.0.0.0", "--model", str(tiny_model)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "refusing to serve on 0.0.0.0" in refused.stderr
    assert "--allow-no-api-key" in refused.stderr and "Traceback" not in refused.stderr
    extra = ["--db", str(tmp_path / "c.db")] if command == "app" else []
    app = AppProcess([command, "--host", "0.0.0.0", "--allow-no-api-key", "--model", str(tiny_model),
                      "--kv-cache-gb", "0.05", *extra], tmp_path, ready_path="/health")
    try:
        assert "warning: listening on 0.0.0.0, beyond this machine" in app.output()
    finally:
        assert app.stop() == 0
