"""The browser UI: pure rendering functions, n samples in the service, and an end-to-end run in Chromium."""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import skip_or_fail
from localchat.engine.block_manager import BlockManager
from localchat.engine.sampling_params import SamplingParams
from localchat.chat.store import Store
from localchat.ui.memory_panel import render_memory_html
from localchat.ui.render import chat_messages, conversation_choices, params_from_ui, safe_markdown

# Gradio's queue uses pandas APIs that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.*")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path("/tmp/localchat_ui.png")
XSS = "<img src=x onerror=alert(1)>"


class _Elements(HTMLParser):
    """Collects (tag, attrs) of every element an HTML string creates."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def elements(html_text: str) -> list[tuple[str, dict]]:
    parser = _Elements()
    parser.feed(html_text)
    return parser.elements


def classes(html_text: str) -> list[set[str]]:
    return [set(a.get("class", "").split()) for _, a in elements(html_text)]


# ------------------------------------------------------------------ memory panel
def _forked_manager() -> BlockManager:
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate(1, list(range(10)))
    bm.append(1, list(range(10)))  # 10 tokens: blocks of 4, 4, 2
    bm.mark_computed(1)
    bm.fork(1, 2)  # seq 2 shares all three blocks
    bm.append(2, [99])  # CoW of the partial last block
    return bm


def test_memory_panel_draws_blocks_tables_and_figures():
    bm = _forked_manager()
    snap = bm.snapshot()
    html_text = render_memory_html(snap)
    cls = classes(html_text)
    grid = [c for c in cls if "lc-blk" in c and "lc-entry" not in c and c & {"lc-free", "lc-used", "lc-cached"}]
    # The legend has one swatch per state; the grid has one cell per block.
    assert len(grid) == 16 + 4
    used = [c for c in grid if "lc-used" in c]
    shared = [c for c in used if "lc-shared" in c]
    f = snap.figures
    assert len(used) - 2 == f.blocks_used  # minus the legend's used and shared swatches
    assert len(shared) - 1 == sum(1 for b in snap.blocks if b.ref_count > 1) == 2
    assert sum("lc-table" in c for c in cls) == 2  # one row per live sequence
    assert sum("lc-entry" in c for c in cls) == sum(len(t) for t in snap.tables.values())
    text = re.sub(r"<[^>]+>", " ", html_text)
    for name in ("blocks_used", "kv_utilization", "sharing_savings", "cow_copies", "prefix hit rate"):
        assert name in text
    assert f"{f.blocks_used} / 16" in text and f.cow_copies == 1
    assert f"{100 * f.sharing_savings:.1f}%" in text

    bm.free(1)
    bm.free(2)
    html_text = render_memory_html(bm.snapshot())
    assert not [c for c in classes(html_text) if "lc-used" in c and "lc-blk" in c and "lc-entry" not in c][2:]
    assert "No live sequences" in html_text


def test_memory_panel_escapes_every_text():
    snap = _forked_manager().snapshot()
    evil_block = dataclasses.replace(snap.blocks[0], state=XSS)
    snap = dataclasses.replace(snap, blocks=(evil_block, *snap.blocks[1:]))
    html_text = render_memory_html(snap, title=XSS)
    assert "<img" not in html_text and "&lt;img" in html_text
    assert all(tag != "img" for tag, _ in elements(html_text))
    assert not any(k.startswith("on") for _, attrs in elements(html_text) for k in attrs)
    assert "No memory snapshot" in render_memory_html(None)


# --------------------------------------------------------------- rendering text
@pytest.mark.parametrize("text", [XSS, f"say {XSS} now", "<script>alert(1)</script>", "a <b onmouseover=x>bold</b>"])
def test_safe_markdown_leaves_no_tags(text):
    out = safe_markdown(text)
    assert "<" not in out and ">" not in out
    assert out.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == text


def test_safe_markdown_keeps_code_as_code():
    text = "Use `a < b` here:\n```html\n<div>x</div>\n```\nand <i>this</i> & that"
    out = safe_markdown(text)
    assert "`a < b`" in out and "```html\n<div>x</div>\n```" in out
    assert out.endswith("and &lt;i&gt;this&lt;/i&gt; &amp; that")


def test_chat_messages_and_sidebar_labels_are_plain(tmp_path):
    with Store(tmp_path / "c.db") as store:
        conv = store.create_conversation(XSS)
        store.append_message(conv.id, None, "user", XSS)
        store.append_message(conv.id, "current", "assistant", f"**bold** {XSS}")
        msgs = chat_messages(store.current_path(conv.id))
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert all("<" not in m["content"] for m in msgs)
        # The sidebar widget shows labels as text (no HTML), so the label is the title itself.
        assert conversation_choices(store.list_conversations()) == [(XSS, str(conv.id))]


@pytest.mark.parametrize(
    "values, message",
    [
        ((-1, 0.9, 10, None, 1), "temperature"),
        ((0.7, 1.5, 10, None, 1), "top_p"),
        ((0.7, 0.9, 0, None, 1), "max_tokens"),
        ((0.7, 0.9, 2.5, None, 1), "max_tokens"),
        ((0.7, 0.9, None, None, 1), "max_tokens"),
        ((0.7, 0.9, 10, "abc", 1), "seed"),
        ((0.7, 0.9, 10, None, 0), "n must be"),
        ((float("nan"), 0.9, 10, None, 1), "temperature"),
    ],
)
def test_bad_sampling_values_are_clear_errors(values, message):
    with pytest.raises(ValueError, match=message):
        params_from_ui(*values)


def test_good_sampling_values():
    p = params_from_ui(0.5, 0.9, 32.0, 7.0, 2)
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.n) == (0.5, 0.9, 32, 7, 2)
    assert params_from_ui(0, 1, 5, "", 1).seed is None


# --------------------------------------------------------------- n samples
@pytest.fixture
def service(chat_service):
    return chat_service(num_blocks=512)


def test_send_samples_saves_each_sample_as_a_sibling(service):
    conv = service.new_conversation()
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True, n=3)
    updates = list(service.send(conv.id, "Name a color", params))
    final = updates[-1]
    assert len(final) == 3 and all(e.finished and e.generated_tokens == 10 for e in final)
    ids = [e.message_id for e in final]
    sib = service.store.siblings(ids[0])
    assert sib.ids == tuple(ids) and sib.index == 0
    path = service.store.current_path(conv.id)
    assert path[-1].id == ids[0]  # sample 0's branch is current
    for event in final:
        m = service.store.get_message(event.message_id)
        assert m.content == event.text and len(m.token_ids) == 10 and m.finish_reason == "length"
    assert len({service.store.get_message(i).content for i in ids}) > 1
    # all samples share the prompt's blocks: a regenerate of n=2 adds two more siblings
    again = list(service.regenerate(ids[1], params.with_(n=2)))[-1]
    assert service.store.siblings(again[0].message_id).count == 5
    assert again[0].prefix_hit_tokens > 0
    assert service.driver.call(lambda e: e.block_manager.figures().blocks_used) == 0


# --------------------------------------------------------------- app.py errors
def test_app_corrupt_database_is_a_clear_error(tmp_path):
    db = tmp_path / "bad.db"
    db.write_bytes(b"this is not a database" * 100)
    proc = subprocess.run([sys.executable, "app.py", "--db", str(db)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_app_help_lists_the_ui_flags():
    proc = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for flag in ("--host", "--port", "--share", "--terminal"):
        assert flag in proc.stdout
    from localchat.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert args.host == "127.0.0.1" and args.share is False and args.terminal is False


# --------------------------------------------------------------- end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
def running_app(chat_service):
    from localchat.ui.app import build_ui, launch

    service = chat_service(num_blocks=256, block_size=16)
    demo = build_ui(service)
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", service.store
    finally:
        demo.close()


def test_browser_chat_regenerate_branches_samples_and_memory(chromium, running_app):
    from playwright.sync_api import expect, sync_playwright

    url, store = running_app
    started = time.monotonic()
    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)
            page.goto(url)
            box = page.locator("#lc-input textarea")
            expect(box).to_be_visible()
            status = page.locator("#lc-status")
            label = page.locator("#lc-branch-label")
            bots = page.locator('#lc-chat [data-testid="bot"]')
            users = page.locator('#lc-chat [data-testid="user"]')

            def setting(elem_id: str, value: str) -> None:
                field = page.locator(f"#{elem_id} input")
                field.fill(value)
                field.press("Tab")

            # Settings: greedy first, so the first reply's length is fixed; open the memory panel.
            page.get_by_text("Settings", exact=True).click()
            setting("lc-temperature", "0")
            setting("lc-max-tokens", "400")
            page.get_by_text("Memory (KV cache blocks)").click()

            # An empty message is refused with a clear message, and nothing is saved.
            page.locator("#lc-send").click()
            expect(page.get_by_text("The message is empty")).to_be_visible()
            assert store.list_conversations() == []

            # Watch the memory panel: the tiny model may reply faster than a person can look.
            page.evaluate("""() => {
                window.__seen = {used: 0, tables: 0};
                new MutationObserver(() => {
                    const mem = document.querySelector('#lc-memory');
                    if (!mem) return;
                    window.__seen.used = Math.max(window.__seen.used, mem.querySelectorAll('.lc-grid .lc-used').length);
                    window.__seen.tables = Math.max(window.__seen.tables, mem.querySelectorAll('.lc-table').length);
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""")

            # Type a message (with an HTML injection attempt) and send it; the reply streams.
            box.fill(f"{XSS} Hello there")
            box.press("Enter")
            expect(status).to_contain_text("generating")
            expect(status).to_contain_text("finished")
            # While it streamed, the memory panel showed used blocks and the live block table.
            seen = page.evaluate("window.__seen")
            assert seen["used"] >= 1 and seen["tables"] >= 1, seen
            expect(bots).to_have_count(1)
            first_reply = bots.first.inner_text().strip()
            assert first_reply
            expect(users.first).to_contain_text(f"{XSS} Hello there")
            expect(page.locator("#lc-conversations")).to_contain_text(XSS)
            assert page.locator("img[src='x']").count() == 0
            assert page.locator("#lc-memory .lc-grid .lc-cached").count() > 0  # the finished reply stays cached
            expect(page.locator("#lc-memory [data-figure='blocks_used_peak'] dd")).not_to_have_text("0")

            # Regenerate (sampled this time): a second branch of the reply, then navigate back and forth.
            setting("lc-temperature", "1.0")
            setting("lc-max-tokens", "120")
            page.locator("#lc-regenerate").click()
            expect(label).to_contain_text("branch 2/2")
            expect(bots).to_have_count(1)
            second_reply = bots.first.inner_text().strip()
            assert second_reply and second_reply != first_reply
            page.locator("#lc-prev").click()
            expect(label).to_contain_text("branch 1/2")
            expect(bots.first).to_have_text(first_reply)
            conv = store.list_conversations()[0]
            assert store.siblings(store.current_path(conv.id)[-1].id).index == 0
            page.locator("#lc-next").click()
            expect(label).to_contain_text("branch 2/2")
            expect(bots.first).to_have_text(second_reply)
            assert store.siblings(store.current_path(conv.id)[-1].id).index == 1
            assert page.locator("#lc-memory .lc-grid i").count() == 256

            # Bad sampling values get a clear message, not a stack trace.
            setting("lc-top-p", "1.5")
            box.fill("Another question")
            page.locator("#lc-send").click()
            expect(page.get_by_text("top_p must be in (0, 1]")).to_be_visible()
            assert len(store.current_path(conv.id)) == 2
            setting("lc-top-p", "0.95")

            # n = 2: two samples side by side, each saved as a sibling reply.
            setting("lc-n", "2")
            setting("lc-max-tokens", "60")
            page.locator("#lc-send").click()
            expect(page.locator("#lc-sample-1")).to_contain_text("Sample 2")
            expect(label).to_contain_text("Reply #4: branch 1/2")
            expect(page.locator("#lc-sample-0")).to_contain_text("Sample 1")
            path = store.current_path(conv.id)
            assert [m.content for m in path[2:3]] == ["Another question"]
            assert store.siblings(path[-1].id).count == 2
            expect(page.get_by_text("top_p must be in (0, 1]")).to_have_count(0, timeout=15_000)  # the toast went away
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            setting("lc-n", "1")

            # Edit the first message: click it, change the text, and a new branch with its reply appears.
            users.first.click()
            edit = page.locator("#lc-edit textarea")
            page.get_by_text("Edit a message").click()
            expect(edit).to_have_value(f"{XSS} Hello there")
            edit.fill("An edited question")
            page.locator("#lc-edit-send").click()
            expect(label).to_contain_text("Message #1: branch 2/2")
            expect(users).to_have_count(1)
            expect(users.first).to_contain_text("An edited question")
            path = store.current_path(conv.id)
            assert [m.content for m in path][0] == "An edited question" and path[-1].finish_reason in ("stop", "length")
            page.locator("#lc-prev").click()
            expect(users).to_have_count(2)
            expect(label).to_contain_text("branch 1/2")

            # Stop a long reply of three samples: what was shown is saved, and every block is released.
            setting("lc-n", "3")
            setting("lc-max-tokens", "450")
            box.fill("Tell me a long story")
            box.press("Enter")
            expect(page.locator("#lc-sample-2")).to_contain_text("Sample 3")
            expect(page.locator("#lc-memory .lc-table")).to_have_count(3)
            page.locator("#lc-stop").click()
            expect(status).to_contain_text("Stopped")
            last = store.current_path(conv.id)[-1]
            assert last.finish_reason == "abort" and store.siblings(last.id).count == 3
            expect(page.locator("#lc-memory [data-figure='blocks_used'] dd")).to_have_text("0 / 256")

            # Sidebar: rename (HTML in a title stays text), start a new chat, come back, delete.
            sidebar = page.locator("#lc-conversations")
            page.locator("#lc-title input").fill(f"Renamed {XSS}")
            page.locator("#lc-rename").click()
            expect(sidebar).to_contain_text(f"Renamed {XSS}")
            assert store.get_conversation(conv.id).title == f"Renamed {XSS}"
            assert page.locator("img[src='x']").count() == 0
            page.locator("#lc-new").click()
            expect(bots).to_have_count(0)
            sidebar.get_by_text(f"Renamed {XSS}").click()
            expect(users).to_have_count(3)
            expect(users.last).to_contain_text("Tell me a long story")
            page.locator("#lc-delete").click()
            expect(sidebar.get_by_text(f"Renamed {XSS}")).to_have_count(0)
            expect(bots).to_have_count(0)
            assert store.list_conversations() == []
        finally:
            browser.close()
    assert dialogs == []
    assert time.monotonic() - started < 90

    # The named API endpoints work without a browser.
    from gradio_client import Client

    client = Client(url, verbose=False)
    out = client.predict(text="Hi from the API", max_tokens=6, temperature=0, api_name="/send")
    assert out["texts"][0] and len(store.current_path(out["conversation_id"])) == 2
    again = client.predict(message_id=out["message_ids"][0], max_tokens=6, n=2, api_name="/regenerate")
    assert len(again["message_ids"]) == 2 and store.siblings(again["message_ids"][0]).count == 3
