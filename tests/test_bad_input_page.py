"""The page's catalogue of bad input, in Chromium against the real `localchat app` (a tiny model, a small
KV pool): each input, the message the page shows, and afterwards no row written, no KV block used and
no request running. Text the browser can hold but that is not Unicode (a lone surrogate) is refused
with a message; NUL and control characters are text like any other. The scripting endpoints (/send,
/edit, /regenerate) answer the same inputs the same way. (The command line and the API: tests/test_bad_input.py.)"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from conftest import skip_or_fail
from localchat.bench.page import set_setting
from helpers.tiny_app import AppProcess, save_tiny_model

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EXPORT = {"format": "localchat.conversation", "version": 1,
          "conversation": {"title": "t", "created_at": 1.0, "updated_at": 1.0},
          "messages": [{"id": 1, "parent": None, "role": "user", "content": "hi", "created_at": 1.0}]}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    model = save_tiny_model(tmp / "tiny-model")
    # 0.0003 GiB of KV cache: ~600-1200 tokens, less than the model's context of 2048.
    running = AppProcess(["app", "--model", str(model), "--db", str(tmp / "chats.db"), "--kv-cache-gb", "0.0003"], tmp)
    running.db = tmp / "chats.db"
    running.tmp = tmp
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def page(app):
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    p = sync_playwright().start()
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(60_000)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.problems = problems
    pg.goto(app.url)
    pg.locator('#lc-chat .lc-conv:not([data-ctx="0"])').wait_for(state="attached")
    yield pg
    browser.close()
    p.stop()


def state(app) -> tuple:
    """(conversations, messages, KV blocks used, requests running): what must not change."""
    conn = sqlite3.connect(f"file:{app.db}?mode=ro", uri=True)
    try:
        rows = tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("conversations", "messages"))
    finally:
        conn.close()
    figures = {}
    for line in httpx.get(app.url + "metrics", timeout=30).text.splitlines():
        if line.startswith(("localchat:blocks_used ", "localchat:num_requests_running ")):
            name, value = line.rsplit(" ", 1)
            figures[name] = float(value)
    return (*rows, figures["localchat:blocks_used "[:-1]], figures["localchat:num_requests_running"])


def clear_toasts(page) -> None:
    for button in page.locator(".toast-close").all():
        try:
            button.click(timeout=2000)
        except Exception:  # noqa: BLE001 - it closed itself meanwhile
            pass
    page.wait_for_function("() => !document.querySelector('.toast-body')")


def type_message(page, text: str) -> None:
    """The message box's value as a user would leave it; JavaScript can hold what a keyboard cannot
    type (a lone surrogate), so the value is set there and announced as input."""
    page.locator("#lc-input textarea").evaluate(
        "(box, text) => { box.value = text; box.dispatchEvent(new Event('input', {bubbles: true})); }", text)


def expect_message(page, message: str) -> str:
    """The toast that says `message`; when it never comes, the failure says what the page showed instead
    (other toasts, a reply that started, the fields' values)."""
    toast = page.locator(".toast-body", has_text=message).first
    try:
        toast.wait_for()
    except Exception as exc:  # noqa: BLE001 - replaced by what the page showed
        shown = page.evaluate("""() => ({
            toasts: [...document.querySelectorAll('.toast-body')].map(t => t.textContent),
            replies: document.querySelectorAll('#lc-chat .lc-msg.lc-assistant').length,
            live: !!document.querySelector('#lc-live .lc-live'),
            max_tokens: document.querySelector('#lc-max-tokens input')?.value})""")
        raise AssertionError(f"no toast saying {message!r}; the page showed {shown}") from exc
    return toast.text_content()


def new_chat(page) -> None:
    page.locator("#lc-new").click()
    page.locator('#lc-chat .lc-conv[data-conv=""]').wait_for(state="attached")


# (what, how: a message to send, or settings then a message, what the page says)
LONG = "word " * 2500
PAGE_CASES = [
    ("empty message", {"text": ""}, "The message is empty: write something first."),
    ("only spaces", {"text": "   \n\t  "}, "The message is empty: write something first."),
    ("longer than the context", {"text": LONG}, "but the model's context holds 2048"),
    ("a lone surrogate", {"text": "bad \ud800 text"}, "is not valid Unicode text: it holds a lone surrogate"),
    ("max tokens beyond the KV cache", {"text": "hi", "settings": {"lc-max-tokens": 1500}}, "or less, or raise --kv-cache-gb"),
    ("max tokens 0", {"text": "hi", "settings": {"lc-max-tokens": 0}}, "max_tokens"),
    ("temperature -1", {"text": "hi", "settings": {"lc-temperature": -1}}, "temperature"),
    ("top-p 1.5", {"text": "hi", "settings": {"lc-top-p": 1.5}}, "top_p"),
    ("100 samples", {"text": "hi", "settings": {"lc-n": 100}}, "n"),
    ("beam width 1000", {"text": "hi", "settings": {"lc-beam": 1000}}, "beam"),
    ("seed that is not a number", {"text": "hi", "settings": {"lc-seed": "abc"}}, "seed"),
]
DEFAULTS = {"lc-max-tokens": 512, "lc-temperature": 0.7, "lc-top-p": 0.95, "lc-n": 1, "lc-beam": 0, "lc-seed": ""}


@pytest.mark.parametrize("case", PAGE_CASES, ids=[c[0] for c in PAGE_CASES])
def test_page_catalogue(app, page, case):
    what, how, message = case
    new_chat(page)
    clear_toasts(page)
    for elem_id, value in how.get("settings", {}).items():
        set_setting(page, elem_id, value)
    before = state(app)
    type_message(page, how["text"])
    page.locator("#lc-send").click()
    shown = expect_message(page, message)
    print(f"{what}: {shown!r}")
    assert "Traceback" not in shown
    assert state(app) == before  # no row, no block, no request
    assert page.locator("#lc-input textarea").input_value() == how["text"]  # the text is still there to fix
    for elem_id in how.get("settings", {}):
        set_setting(page, elem_id, DEFAULTS[elem_id])
    assert page.problems == []


def test_page_takes_control_characters_as_text(app, page):
    new_chat(page)
    before = state(app)
    type_message(page, "nul \x00 bell \x07 esc \x1b[1m end")
    page.locator("#lc-send").click()
    page.wait_for_function("() => document.querySelectorAll('#lc-chat .lc-msg.lc-assistant').length >= 1"
                           " && !document.querySelector('#lc-live .lc-live')")
    assert "esc" in page.locator("#lc-chat .lc-msg.lc-user .lc-body").first.text_content()
    after = state(app)
    assert after[:2] == (before[0] + 1, before[1] + 2) and after[3] == 0


def test_page_regenerate_rename_and_import_refusals(app, page):
    new_chat(page)
    clear_toasts(page)
    before = state(app)
    page.locator("#lc-regenerate").click()
    print("regenerate with nothing:", expect_message(page, "There is no reply to regenerate yet"))
    assert state(app) == before
    # A title that is not text, on an existing conversation.
    type_message(page, "a conversation to rename")
    page.locator("#lc-send").click()
    page.wait_for_function("() => document.querySelectorAll('#lc-chat .lc-msg.lc-assistant').length >= 1"
                           " && !document.querySelector('#lc-live .lc-live')")
    clear_toasts(page)
    before = state(app)
    page.locator("#lc-title input, #lc-title textarea").first.evaluate(
        "(box) => { box.value = 'title \\ud800'; box.dispatchEvent(new Event('input', {bubbles: true})); }")
    page.locator("#lc-rename").click()
    print("rename:", expect_message(page, "title is not valid Unicode text"))
    assert state(app) == before
    # Files that are not exports.
    files = {
        "binary.json": (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "not UTF-8 text"),
        "other.json": (json.dumps({"format": "something else"}).encode(), "not a localchat export"),
        "surrogate.json": (json.dumps({**EXPORT, "messages": [{**EXPORT["messages"][0], "content": "\udc80"}]}).encode(),
                           "content is not valid Unicode text"),
    }
    for name, (data, message) in files.items():
        path = app.tmp / name
        path.write_bytes(data)
        clear_toasts(page)
        before = state(app)
        with page.expect_file_chooser() as chooser:
            page.locator("#lc-import").click()
        chooser.value.set_files(str(path))
        print(f"import {name}:", expect_message(page, message))
        assert state(app) == before
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "bad_input_page.png"), full_page=True)
    assert page.problems == []


@pytest.mark.parametrize("endpoint, args, message", [
    ("/send", ("", None), "the message is empty"),  # (gradio_client cannot send a lone surrogate: the page case above does)
    ("/send", ("word " * 2500, None), "context holds 2048"),
    ("/send", ("hi", None, 0.7, 0.95, 1500), "or less, or raise --kv-cache-gb"),
    ("/send", ("hi", None, -1.0), "temperature"),
    ("/send", ("hi", 99999), "99999"),
    ("/regenerate", (99999,), "99999"),
    ("/edit", (99999, "new text"), "99999"),
])
def test_scripting_endpoints_catalogue(app, endpoint, args, message):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app.url, verbose=False)
    before = state(app)
    with pytest.raises(AppError) as raised:
        client.predict(*args, api_name=endpoint)
    print(f"{endpoint} {str(args)[:40]}: {raised.value}")
    assert message in str(raised.value) and "Traceback" not in str(raised.value)
    assert state(app) == before
