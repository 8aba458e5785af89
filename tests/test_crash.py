"""Crash safety: the real app (`localchat app` on a tiny model) streams replies into two browser tabs
and is killed with SIGKILL at a random moment, twice over one database (LOCALCHAT_CRASH_ITERATIONS for more:
each round restarts the app, ~23 s on an AVX2-only 2-core host); the first kill always lands while a reply is
streaming, the others anywhere. Every message the database
held before the kill is there after it (a reply still streaming may only have grown), `PRAGMA
integrity_check` passes, the engine's process does not outlive the app, and on restart the partial
replies are shown as interrupted and each can be regenerated."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from conftest import skip_or_fail
from helpers.tiny_app import AppProcess, integrity, read_messages, save_tiny_model

ITERATIONS = int(os.environ.get("LOCALCHAT_CRASH_ITERATIONS", "2"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


class Watcher(threading.Thread):
    """Reads the database every 50 ms from another connection, as any reader would; `last` is the
    newest state seen: what was saved before the kill."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.last, self.reads = path, {}, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.last = read_messages(self.path)
                self.reads += 1
            except sqlite3.Error:
                pass  # the file is being created
            self._halt.wait(0.05)

    def wait_streaming(self, timeout: float = 60) -> None:
        """Until a reply is seen half written."""
        deadline = time.monotonic() + timeout
        while not any(row[2] == "assistant" and row[4] == "streaming" for row in self.last.values()):
            assert time.monotonic() < deadline, "no reply started streaming"
            time.sleep(0.02)

    def stop(self) -> dict[int, tuple]:
        self._halt.set()
        self.join()
        return self.last


def start_app(model: Path, db: Path) -> AppProcess:
    return AppProcess(["app", "--model", str(model), "--db", str(db), "--no-api", "--kv-cache-gb", "0.05"], db.parent)


def check_nothing_saved_was_lost(before: dict, after: dict) -> None:
    for mid, (conv, parent, role, content, reason) in before.items():
        assert mid in after, f"message {mid} was saved before the kill and is gone"
        conv2, parent2, role2, content2, reason2 = after[mid]
        assert (conv2, parent2, role2) == (conv, parent, role)
        if reason == "streaming":  # it may have been saved again, longer, before the kill landed
            assert content2.startswith(content) and (reason2 == "streaming" or reason2 is not None)
        else:
            assert (content2, reason2) == (content, reason), mid


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    p = sync_playwright().start()
    b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield b
    finally:
        b.close()
        p.stop()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_tabs(tabs, url: str) -> None:
    """Both tabs start loading the page at once: each waits for the other's load otherwise (~4 s a tab)."""
    for tab in tabs:
        tab.goto(url, wait_until="commit")


def send_in_tab(page, text: str) -> None:
    """A new conversation in this tab (its page loading), and a message in it."""
    # The page's load event has answered (it opens the newest conversation) once the chat knows the
    # model's context; only then does "New chat" stay new.
    page.locator('#lc-chat .lc-conv:not([data-ctx="0"])').wait_for(state="attached")
    page.locator("#lc-new").click()
    page.locator('#lc-chat .lc-conv[data-conv=""]').wait_for(state="attached")
    page.locator("#lc-input textarea").fill(text)
    page.locator("#lc-send").click()


def test_sigkill_while_two_tabs_stream_loses_nothing_saved(browser, tmp_path):
    model = save_tiny_model(tmp_path / "tiny-model")
    db = tmp_path / "chats.db"
    rng = random.Random(int(os.environ.get("LOCALCHAT_CRASH_SEED", "20")))
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tabs = [context.new_page(), context.new_page()]
    for tab in tabs:
        tab.set_default_timeout(60_000)
    interrupted_seen = 0
    previous_interrupted: list[tuple[int, int]] = []  # (conversation, message) left streaming by the last kill
    for iteration in range(ITERATIONS):
        app = start_app(model, db)
        # On restart, the last kill's partial replies are there, marked as interrupted.
        for conv, mid in previous_interrupted[:1]:
            tabs[0].goto(f"{app.url}?c={conv}")
            stats = tabs[0].locator(f'#lc-chat article.lc-msg[data-id="{mid}"] .lc-stats')
            try:
                stats.wait_for(state="attached")
            except Exception:
                shot(tabs[0], "crash_restart_failed")
                raise
            assert "interrupted" in stats.text_content()
            interrupted_seen += 1
        watcher = Watcher(db)
        watcher.start()
        open_tabs(tabs, app.url)
        for k, tab in enumerate(tabs):
            send_in_tab(tab, f"Tell me a long story, tab {k}, round {iteration}.")
        if iteration == 0:  # so that the next start always shows an interrupted reply
            watcher.wait_streaming()
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # the kill lands anywhere: before, during or after the replies
            time.sleep(rng.uniform(0.3, 5.0))
        before = watcher.stop()
        app.kill()
        assert integrity(db) == [("ok",)]
        after = read_messages(db)
        check_nothing_saved_was_lost(before, after)
        previous_interrupted = sorted(((conv, mid) for mid, (conv, _, role, _, reason) in after.items()
                                       if role == "assistant" and reason == "streaming"), key=lambda cm: -cm[1])
    assert watcher.reads > 0 and interrupted_seen > 0

    # The last restart: every interrupted reply can be regenerated; one of them through the page.
    app = start_app(model, db)
    try:
        streaming = [(mid, row) for mid, row in read_messages(db).items() if row[2] == "assistant" and row[4] == "streaming"]
        assert streaming, "no kill landed while a reply was streaming: change LOCALCHAT_CRASH_SEED"
        mid, (conv, parent, *_rest) = streaming[-1]
        tab = tabs[0]
        tab.goto(f"{app.url}?c={conv}")
        tab.locator(f'#lc-chat article.lc-msg[data-id="{mid}"] button[data-act="regen"]').click()
        tab.locator(f'#lc-chat article.lc-msg[data-parent="{parent}"]:not([data-id="{mid}"]) .lc-stats').first.wait_for(state="attached")
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / "crash_regenerated.png"), full_page=True)
        regenerate_everywhere(db, [m for m, _ in streaming])
    finally:
        app.stop()
        context.close()
    assert integrity(db) == [("ok",)]


def regenerate_everywhere(db: Path, message_ids: list[int]) -> None:
    """Each interrupted reply gets a finished sibling through ChatService (another process on the same file)."""
    from helpers.tiny import default_tokenizer, tiny_engine
    from localchat.chat.service import ChatService
    from localchat.chat.store import Store
    from localchat.engine import EngineDriver, SamplingParams

    driver = EngineDriver(tiny_engine(default_tokenizer(), num_blocks=512))
    store = Store(db)
    try:
        service = ChatService(driver, store)
        for mid in message_ids:
            count = store.siblings(mid).count
            for _ in service.regenerate(mid, SamplingParams(max_tokens=4)):
                pass
            siblings = store.siblings(mid)
            assert siblings.count == count + 1
            assert store.get_message(siblings.ids[-1]).finish_reason in ("stop", "length")
    finally:
        driver.shutdown()
        store.close()
