"""The page in Chromium (Debian's, driven by Playwright), on a tiny random-weight engine: every branch at
hand, compare and pick, statistics, export and import, search, keyboard, presets, several tabs, and the
memory panel's story. Each test saves a screenshot under tests/artifacts/."""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import skip_or_fail
from localchat.bench.page import open_memory_panel, set_setting
from playwright.sync_api import expect

pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.*"), pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
XSS = "<img src=x onerror=alert(1)>"
TIMEOUT_MS = 60_000


@dataclass
class App:
    url: str
    store: object
    service: object
    presets_path: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from helpers.tiny import default_tokenizer, tiny_engine
    from localchat.chat.service import ChatService
    from localchat.chat.store import Store
    from localchat.engine import EngineDriver
    from localchat.ui.app import build_ui, launch
    from localchat.ui.presets import Presets

    tmp = tmp_path_factory.mktemp("ui")
    driver = EngineDriver(tiny_engine(default_tokenizer(), num_blocks=256, block_size=16))
    store = Store(tmp / "chats.db")
    service = ChatService(driver, store)
    demo = build_ui(service, presets=Presets(tmp / "presets.json"))
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield App(f"http://127.0.0.1:{port}/", store, service, tmp / "presets.json")
    finally:
        demo.close()
        driver.shutdown()
        store.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    p = sync_playwright().start()
    b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield b
    finally:
        b.close()
        p.stop()


@pytest.fixture
def page(browser, app, request):
    context = browser.new_context(viewport={"width": 1400, "height": 950}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    try:
        yield pg
    finally:
        context.close()
    assert problems == []


# ------------------------------------------------------------------ helpers
def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_conversation(page, app: App, conv_id: int | None = None) -> None:
    page.goto(app.url + (f"?c={conv_id}" if conv_id else ""))
    page.locator("#lc-input textarea").wait_for()
    # The load event has answered (the chat knows the model's context): a click on "New chat" made
    # before it would be undone by the conversation it opens.
    page.locator('#lc-chat .lc-conv:not([data-ctx="0"])').wait_for(state="attached")
    if conv_id:
        page.locator(f'#lc-chat .lc-conv[data-conv="{conv_id}"]').wait_for(state="attached")


def new_chat(page) -> None:
    page.locator("#lc-new").click()
    page.locator('#lc-chat .lc-conv[data-conv=""]').wait_for(state="attached")


def shown(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('#lc-chat .lc-msg:not([hidden]) .lc-body')].map(e => e.textContent.trim())")


def replies(page) -> int:
    return page.locator("#lc-chat .lc-msg.lc-assistant").count()


def wait_replies(page, count: int) -> None:
    try:
        page.wait_for_function(
            "n => document.querySelectorAll('#lc-chat .lc-msg.lc-assistant').length >= n && !document.querySelector('#lc-live .lc-live')",
            arg=count)
    except Exception as exc:  # noqa: BLE001 - replaced by what the page showed
        shot(page, "wait_replies_timeout")
        raise AssertionError(f"{count} replies never showed; the page showed {page_state(page)}") from exc


def start_long_reply(page, text: str, max_tokens: int) -> None:
    """Send `text` and wait until the reply's first tokens are on the page (it goes on writing)."""
    set_setting(page, "lc-max-tokens", max_tokens)
    box = page.locator("#lc-input textarea")
    box.fill(text)
    box.press("Enter")
    page.wait_for_function("() => (document.querySelector('#lc-live .lc-streaming .lc-body') || {}).textContent")


def page_state(page) -> dict:
    return page.evaluate("""() => ({
      conv: document.querySelector('#lc-chat .lc-conv')?.dataset.conv,
      replies: document.querySelectorAll('#lc-chat .lc-msg.lc-assistant').length,
      live: document.querySelector('#lc-live')?.innerHTML.slice(0, 300),
      status: document.querySelector('#lc-status')?.textContent,
      toasts: [...document.querySelectorAll('.toast-body')].map(t => t.textContent),
      input: document.querySelector('#lc-input textarea')?.value})""")


def send(page, text: str, *, expect_replies: int = 1) -> None:
    before = replies(page)
    box = page.locator("#lc-input textarea")
    box.fill(text)
    box.press("Enter")
    wait_replies(page, before + expect_replies)


def upload(page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator("#lc-import").click()
    chooser.value.set_files(str(path))


def eventually(check, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def three_level_tree(store, title: str):
    """u1 -> a1 | a2 ; a2 -> u2 | u2e ; u2e -> a3 | a4 | a5 (current: a5)."""
    c = store.create_conversation(title)
    u1 = store.append_message(c.id, None, "user", f"first question {XSS}", token_ids=list(range(100, 140)))
    a1 = store.append_message(c.id, u1.id, "assistant", "reply one", token_ids=[1, 2, 3], model="tiny", generated_tokens=3)
    a2 = store.append_message(c.id, u1.id, "assistant", "reply two", token_ids=[4, 5], model="tiny", generated_tokens=2)
    u2 = store.append_message(c.id, a2.id, "user", "second question", token_ids=[6, 7])
    u2e = store.append_message(c.id, a2.id, "user", "second question, edited", token_ids=[6, 8])
    a3 = store.append_message(c.id, u2e.id, "assistant", "three", token_ids=[9])
    a4 = store.append_message(c.id, u2e.id, "assistant", "four", token_ids=[10])
    a5 = store.append_message(c.id, u2e.id, "assistant", "five", token_ids=[11])
    return c, dict(u1=u1, a1=a1, a2=a2, u2=u2, u2e=u2e, a3=a3, a4=a4, a5=a5)


def nav(page, text: str, button: str):
    """Click ‹ or › on the shown message whose text is `text`."""
    msg = page.locator("#lc-chat .lc-msg:not([hidden])").filter(has=page.locator(".lc-body", has_text=text)).first
    msg.locator(".lc-prev" if button == "‹" else ".lc-next").click()


def position(page, text: str) -> str:
    msg = page.locator("#lc-chat .lc-msg:not([hidden])").filter(has=page.locator(".lc-body", has_text=text)).first
    return msg.locator(".lc-pos").inner_text()


# ------------------------------------------------------------------ branches
def test_per_message_navigation_three_levels_deep(page, app):
    store = app.store
    c, m = three_level_tree(store, f"Three levels {XSS}")
    open_conversation(page, app, c.id)
    first = f"first question {XSS}"
    assert shown(page) == [first, "reply two", "second question, edited", "five"]
    assert position(page, "five") == "3/3" and position(page, "second question, edited") == "2/2" and position(page, "reply two") == "2/2"
    assert page.locator("#lc-chat .lc-msg:not([hidden])").first.locator(".lc-nav").count() == 0  # no siblings, no control

    nav(page, "five", "‹")  # level 3
    assert shown(page)[-1] == "four" and position(page, "four") == "2/3"
    nav(page, "four", "‹")
    assert shown(page)[-1] == "three" and page.locator("#lc-chat .lc-msg:not([hidden]) .lc-prev").last.is_disabled()
    assert eventually(lambda: store.get_conversation(c.id).current_leaf_id == m["a3"].id)
    shot(page, "nav_level3")

    nav(page, "second question, edited", "‹")  # level 2: the other edit has no reply yet
    assert shown(page) == [first, "reply two", "second question"]
    nav(page, "reply two", "‹")  # level 1
    assert shown(page) == [first, "reply one"] and position(page, "reply one") == "1/2"
    assert eventually(lambda: store.get_conversation(c.id).current_leaf_id == m["a1"].id)
    nav(page, "reply one", "›")  # back: the branch resumes at its newest message
    assert shown(page) == [first, "reply two", "second question, edited", "five"]
    nav(page, "second question, edited", "‹")
    assert eventually(lambda: store.get_conversation(c.id).current_leaf_id == m["u2"].id)
    shot(page, "nav_three_levels")

    page.reload()  # the branch shown is the one saved
    page.locator(f'#lc-chat .lc-conv[data-conv="{c.id}"]').wait_for(state="attached")
    assert shown(page) == [first, "reply two", "second question"]
    assert page.locator("img[src='x']").count() == 0


def test_the_overview_jumps_to_a_branch(page, app):
    c, m = three_level_tree(app.store, "Overview")
    open_conversation(page, app, c.id)
    overview = page.locator("#lc-overview")
    assert overview.locator(".lc-ov-node").count() == 8
    assert overview.locator(".lc-ov-node.lc-on-path").count() == 4
    overview.locator(f'.lc-ov-node[data-node="{m["a1"].id}"]').click()
    assert shown(page) == [f"first question {XSS}", "reply one"]
    assert overview.locator(".lc-on-path").count() == 2
    overview.locator(f'.lc-ov-node[data-node="{m["a4"].id}"]').click()
    assert shown(page)[-2:] == ["second question, edited", "four"]
    assert eventually(lambda: app.store.get_conversation(c.id).current_leaf_id == m["a4"].id)
    # token ids the engine never computed are marked as not cached
    assert overview.locator(".lc-ov-node .lc-cache-none").count() == 8
    shot(page, "overview_jump")


def test_edit_and_regenerate_in_place_make_branches(page, app):
    open_conversation(page, app)
    new_chat(page)
    set_setting(page, "lc-max-tokens", 12)
    send(page, "Original question")
    page.locator("#lc-chat .lc-user:not([hidden]) [data-act=edit]").click()
    editor = page.locator("#lc-chat .lc-editor textarea")
    assert editor.input_value() == "Original question"
    editor.fill("Edited question")
    editor.press("Enter")
    wait_replies(page, 2)
    assert shown(page)[0] == "Edited question" and position(page, "Edited question") == "2/2"
    page.locator("#lc-chat .lc-assistant:not([hidden]) [data-act=regen]").click()
    wait_replies(page, 3)
    assert page.locator("#lc-chat .lc-assistant:not([hidden]) .lc-pos").inner_text() == "2/2"
    conv = app.store.list_conversations()[0]
    path = app.store.current_path(conv.id)
    assert [x.content for x in path][0] == "Edited question" and app.store.siblings(path[-1].id).count == 2
    shot(page, "edit_regenerate")


# ------------------------------------------------------------------ compare
def test_compare_six_samples_and_continue_with_the_fourth(page, app):
    open_conversation(page, app)
    new_chat(page)
    set_setting(page, "lc-temperature", 1.0)
    set_setting(page, "lc-max-tokens", 24)
    set_setting(page, "lc-n", 6)
    send(page, "Six ways to say hello")
    cards = page.locator("#lc-compare .lc-card")
    assert cards.count() == 6
    tops = page.evaluate("() => [...document.querySelectorAll('#lc-compare .lc-card')].map(c => c.getBoundingClientRect().top)")
    assert len({round(t) for t in tops}) >= 2  # they wrap into rows
    assert all("tokens" in t and "tok/s" in t and "prefix cache" in t and "tiny" in t for t in cards.locator(".lc-stats").all_inner_texts())
    assert "lc-current" in cards.nth(0).get_attribute("class")
    fourth_id = int(cards.nth(3).get_attribute("data-id"))
    fourth_text = cards.nth(3).locator(".lc-body").inner_text().strip()
    cards.nth(3).locator(".lc-continue").click()
    assert shown(page)[-1] == fourth_text and "lc-current" in cards.nth(3).get_attribute("class")
    assert position(page, fourth_text) == "4/6"
    conv_id = int(page.locator("#lc-chat .lc-conv").get_attribute("data-conv"))
    assert eventually(lambda: app.store.get_conversation(conv_id).current_leaf_id == fourth_id)
    shot(page, "compare_six")

    set_setting(page, "lc-n", 1)
    send(page, "Go on from the fourth")  # the conversation continues on the chosen branch
    path = app.store.current_path(conv_id)
    assert path[-3].id == fourth_id and path[-2].content == "Go on from the fourth"

    page.reload()  # the comparison can be reopened later
    page.locator(f'#lc-chat .lc-conv[data-conv="{conv_id}"]').wait_for(state="attached")
    msg = page.locator(f'#lc-chat .lc-msg[data-id="{fourth_id}"]')
    msg.locator("[data-act=compare]").click()
    expect(cards).to_have_count(6)
    assert "lc-current" in cards.nth(3).get_attribute("class")
    assert cards.locator(".lc-group").all_inner_texts() == [f"sample {i} of 6" for i in range(1, 7)]
    shot(page, "compare_reopened")


def test_beam_search_shows_each_beams_score(page, app):
    open_conversation(page, app)
    new_chat(page)
    set_setting(page, "lc-n", 1)
    set_setting(page, "lc-beam", 3)
    set_setting(page, "lc-max-tokens", 8)
    send(page, "Beam me up")
    cards = page.locator("#lc-compare .lc-card")
    assert cards.count() == 3
    assert cards.locator(".lc-group").all_inner_texts() == ["beam 1 of 3", "beam 2 of 3", "beam 3 of 3"]
    scores = [float(t.split("beam score ")[1].split(" ")[0]) for t in cards.locator(".lc-stats").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    set_setting(page, "lc-beam", 0)
    shot(page, "beam_search")


# ------------------------------------------------------------------ statistics, gauge, label
def test_statistics_under_replies_survive_a_reload(page, app):
    open_conversation(page, app)
    new_chat(page)
    set_setting(page, "lc-max-tokens", 16)
    send(page, "Statistics please")
    send(page, "And again")
    stats = page.locator("#lc-chat .lc-assistant:not([hidden]) .lc-stats").all_inner_texts()
    assert len(stats) == 2
    for line in stats:
        for part in ("tokens", "first token", "tok/s", "prompt tokens from the prefix cache", "tiny"):
            assert part in line, line
    assert "0 of" not in stats[1]  # the second turn's history came from the prefix cache
    page.reload()
    page.locator("#lc-chat .lc-assistant").first.wait_for()
    assert page.locator("#lc-chat .lc-assistant:not([hidden]) .lc-stats").all_inner_texts() == stats
    # nothing covers the top of the first message (the old chatbot's "Chat" label did)
    covered = page.evaluate("""() => {
      const m = document.querySelector('#lc-chat .lc-msg:not([hidden])');
      const r = m.getBoundingClientRect();
      return [[r.left + 6, r.top + 4], [r.right - 6, r.top + 4]].some(([x, y]) => !m.contains(document.elementFromPoint(x, y)));
    }""")
    assert not covered
    gauge = page.locator("#lc-gauge")
    expect(gauge).to_contain_text("context:")
    expect(gauge).to_contain_text("of 512 tokens")
    set_setting(page, "lc-max-tokens", 500)  # the next reply could not fit: the gauge says so before it happens
    expect(gauge).to_contain_text("may stop early")
    expect(gauge.locator(".lc-gauge")).to_have_class(re.compile(r"\blc-warn\b"))
    shot(page, "statistics_after_reload")


# ------------------------------------------------------------------ conversations
def test_export_then_import_gives_the_same_tree(page, app, tmp_path):
    c, m = three_level_tree(app.store, "Round trip")
    open_conversation(page, app, c.id)
    before = shown(page)
    page.locator("#lc-export-json").click()
    link = page.locator("#lc-export-file a").first
    link.wait_for()
    with page.expect_download() as got:
        link.click()
    path = tmp_path / "export.json"
    got.value.save_as(path)
    exported = path.read_text(encoding="utf-8")
    assert exported == app.store.export_json(c.id)
    upload(page, path)
    page.wait_for_function("old => { const c = document.querySelector('#lc-chat .lc-conv'); return c && c.dataset.conv && c.dataset.conv !== old; }",
                           arg=str(c.id))
    new_id = int(page.locator("#lc-chat .lc-conv").get_attribute("data-conv"))
    assert new_id != c.id and app.store.export_json(new_id) == exported  # the same tree, every branch
    assert shown(page) == before
    page.locator("#lc-export-md").click()
    with page.expect_download() as md:
        page.locator("#lc-export-file a").first.click()
    text = Path(md.value.path()).read_text(encoding="utf-8")
    assert text.startswith("# Round trip") and "five" in text and "reply one" not in text  # the current branch
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    upload(page, bad)
    page.get_by_text("not a localchat export").first.wait_for()
    shot(page, "export_import")


def test_search_by_title_and_content(page, app):
    store = app.store
    a = store.create_conversation("Alpha apples")
    store.append_message(a.id, None, "user", "talk about zebras")
    b = store.create_conversation("Beta bananas")
    u = store.append_message(b.id, None, "user", "hello")
    store.append_message(b.id, u.id, "assistant", "the quokka is hidden on a branch")
    store.append_message(b.id, u.id, "assistant", "current reply")
    open_conversation(page, app, b.id)
    page.wait_for_function("() => document.querySelectorAll('#lc-conversations label').length >= 2")  # loaded
    search = page.locator("#lc-search input, #lc-search textarea").first
    sidebar = page.locator("#lc-conversations")
    search.fill("quokka")
    page.wait_for_function("() => document.querySelectorAll('#lc-conversations label').length === 1")
    assert sidebar.locator("label").all_inner_texts() == ["Beta bananas"]
    search.fill("apples")
    page.wait_for_function("() => [...document.querySelectorAll('#lc-conversations label')].map(l => l.textContent.trim()).join() === 'Alpha apples'")
    sidebar.get_by_text("Alpha apples").click()
    page.locator(f'#lc-chat .lc-conv[data-conv="{a.id}"]').wait_for(state="attached")
    assert shown(page) == ["talk about zebras"]
    shot(page, "search")
    search.fill("")
    page.wait_for_function("() => document.querySelectorAll('#lc-conversations label').length >= 2")


def _requests_until_first_tokens(page, act) -> list[tuple[str, dict | None]]:
    """What the page asked the server from `act` until the reply's first tokens show: (path, JSON body)."""
    seen: list = []

    def record(r):
        try:
            body = json.loads(r.post_data) if r.method == "POST" and r.post_data else None
        except ValueError:
            body = None
        seen.append((r.url.split("?")[0].split("/", 3)[-1], body))

    page.on("request", record)
    act()
    page.wait_for_function("() => (document.querySelector('#lc-live .lc-streaming .lc-body') || {}).textContent")
    page.remove_listener("request", record)
    return seen


def test_a_reply_starts_with_one_plain_request_and_no_gradio_event(page, app):
    """Send, ↻ under the chat, ↻ on a reply and an edit each start their reply with one request of the page
    script (localchat/ui/streaming.py server_start_reply): no Gradio event leaves the page before the reply's
    first tokens show. The settings it carries are the page's, though the Settings panel was never opened,
    and then the ones typed in it."""
    from localchat import settings

    open_conversation(page, app)
    new_chat(page)
    box = page.locator("#lc-input textarea")
    box.fill("Start me plainly")
    sent = _requests_until_first_tokens(page, lambda: box.press("Enter"))
    starts = [body["data"] for path, body in sent if path.endswith("component_server/") and body and body.get("fn_name") == "start_reply"]
    assert sent[0][0].endswith("component_server/") and len(starts) == 1, sent
    assert starts[0]["action"] == "send" and starts[0]["text"] == "Start me plainly"
    assert starts[0]["settings"][5] == settings.DEFAULT_MAX_TOKENS and not page.locator("#lc-max-tokens input").count()
    wait_replies(page, 1)
    assert box.input_value() == "" and page.locator('#lc-chat .lc-conv:not([data-conv=""])').count() == 1

    set_setting(page, "lc-max-tokens", 9)
    actions = {
        "regenerate": lambda: page.locator("#lc-regenerate").click(),
        "regenerate_message": lambda: page.locator("#lc-chat .lc-assistant:not([hidden]) [data-act=regen]").click(),
    }
    for n, (action, act) in enumerate(actions.items()):
        sent = _requests_until_first_tokens(page, act)
        assert not [path for path, _ in sent if "queue/join" in path], sent
        (start,) = [body["data"] for _, body in sent if body and body.get("fn_name") == "start_reply"]
        assert start["action"] == action and start["settings"][5] == 9
        wait_replies(page, n + 2)
    page.locator("#lc-chat .lc-user:not([hidden]) [data-act=edit]").click()
    sent = _requests_until_first_tokens(page, lambda: page.locator("#lc-chat .lc-editor textarea").fill("Edited") or
                                        page.locator("#lc-chat .lc-editor textarea").press("Enter"))
    assert not [path for path, _ in sent if "queue/join" in path], sent
    wait_replies(page, 4)
    assert shown(page)[0] == "Edited"


def test_keyboard_enter_sends_shift_enter_new_line_escape_stops(page, app):
    open_conversation(page, app)
    new_chat(page)
    set_setting(page, "lc-max-tokens", 8)
    box = page.locator("#lc-input textarea")
    box.fill("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    box.press("Enter")
    wait_replies(page, 1)
    conv_id = int(page.locator("#lc-chat .lc-conv").get_attribute("data-conv"))
    assert app.store.current_path(conv_id)[0].content == "line one\nline two"

    start_long_reply(page, "Tell me a very long story", 450)
    page.keyboard.press("Escape")
    page.locator("#lc-status").get_by_text("Stopped").wait_for()
    reply = app.store.current_path(conv_id)[-1]
    assert reply.finish_reason == "abort" and reply.content and len(reply.token_ids) < 450
    assert eventually(lambda: app.service.driver.call(lambda e: e.block_manager.figures().blocks_used) == 0)
    shot(page, "escape_stops")


def test_a_reply_goes_on_while_the_page_shows_another_chat_and_one_at_a_time(page, app):
    """No Gradio event stays open while a reply streams: a second send is refused with a message (the
    box keeps its text), another conversation can be opened meanwhile without ending the reply or
    being pulled back to it, and the reply is complete when its conversation is opened again."""
    other = app.store.create_conversation("Another chat")
    question = app.store.append_message(other.id, None, "user", "What is in the other chat?")
    app.store.append_message(other.id, question.id, "assistant", "Another conversation.")
    open_conversation(page, app)
    new_chat(page)
    start_long_reply(page, "Tell me a long story", 450)
    box = page.locator("#lc-input textarea")
    conv_id = next(c.id for c in app.store.list_conversations() if c.title == "Tell me a long story")
    box.fill("And another one")
    box.press("Enter")
    page.locator(".toast-body", has_text="A reply is still being written").first.wait_for()
    assert box.input_value() == "And another one"
    page.locator("#lc-conversations label", has_text="Another chat").click()
    page.locator(f'#lc-chat .lc-conv[data-conv="{other.id}"]').wait_for(state="attached")
    assert eventually(lambda: app.store.current_path(conv_id)[-1].finish_reason not in (None, "streaming"))
    reply = app.store.current_path(conv_id)[-1]
    assert reply.role == "assistant" and reply.finish_reason != "abort" and reply.content, reply
    page.wait_for_timeout(500)  # the reply's end must not bring its conversation back
    assert page.locator("#lc-chat .lc-conv").get_attribute("data-conv") == str(other.id)
    assert not page.locator("#lc-live .lc-live").count()
    open_conversation(page, app, conv_id)
    assert shown(page)[0] == "Tell me a long story" and len(shown(page)) == 2


def test_closing_the_tab_ends_its_reply_and_keeps_the_text(browser, app):
    ctx = browser.new_context(viewport={"width": 1400, "height": 950})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    open_conversation(pg, app)
    new_chat(pg)
    start_long_reply(pg, "Tell me a very long story", 480)
    conv_id = next(c.id for c in app.store.list_conversations() if c.title == "Tell me a very long story")
    ctx.close()
    assert eventually(lambda: app.store.current_path(conv_id)[-1].finish_reason == "abort")
    reply = app.store.current_path(conv_id)[-1]
    assert reply.role == "assistant" and reply.content and len(reply.token_ids) < 480
    assert eventually(lambda: app.service.driver.call(lambda e: e.block_manager.figures().blocks_used) == 0)


def test_a_click_leaves_no_animation_running(page, app):
    """After a click the page asks for (almost) no animation frames: each frame costs the CPU the engine
    runs on. Gradio's loading spinner, shown on an event's outputs, keeps a 60-frames-a-second spring loop
    going for seconds after it is removed (measured: ~120 frames in the 2 s after "New chat"); every
    event of the page hides it (localchat/ui/app.py), and the elapsed-time counter runs once a second
    (assets/quiet_timers.js)."""
    open_conversation(page, app)
    page.wait_for_timeout(4000)  # the app's own loading spinner (before any event) has run its course
    page.locator("#lc-new").click()
    frames = page.evaluate("""() => new Promise((done) => {
      let n = 0;
      const raf = window.requestAnimationFrame, who = {};
      window.requestAnimationFrame = (cb) => { n += 1; const k = String(cb).slice(0, 60); who[k] = (who[k] || 0) + 1; return raf(cb); };
      setTimeout(() => { window.requestAnimationFrame = raf; done({n, who}); }, 2000);
    })""")
    page.locator('#lc-chat .lc-conv[data-conv=""]').wait_for(state="attached")
    assert frames["n"] <= 10, frames


# Counts, before any of the page's scripts run, the frames Gradio's elapsed-time counters ask Chromium for.
_COUNT_COUNTER_FRAMES = """(() => {
  const isCounter = (cb) => typeof cb === 'function' && String(cb).includes('performance.now()') && String(cb).includes('/1e3') && String(cb).length < 120;
  const native = window.requestAnimationFrame.bind(window);
  window.__lcCounterFrames = 0;
  window.requestAnimationFrame = (cb) => { if (isCounter(cb)) window.__lcCounterFrames += 1; return native(cb); };
})()"""


def test_gradios_idle_counters_keep_counting_without_asking_for_frames(browser, app):
    """Gradio's elapsed-time counters of hidden, idle status trackers loop on requestAnimationFrame.
    assets/quiet_timers.js runs them once a second on one timer, and asks Chromium for no frame for them:
    each one asked for was a full main-thread lifecycle (~4 a second while a reply streamed). With the
    script's previous version (one timer per counter, each then asking for a frame) the frames counted."""
    context = browser.new_context(viewport={"width": 1400, "height": 950})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.add_init_script(_COUNT_COUNTER_FRAMES)
        open_conversation(page, app)
        before = page.evaluate("() => [window.__lcCounterFrames, window.lcQuietTimers.runs]")
        start_long_reply(page, "Tell me a long story.", 400)
        page.wait_for_timeout(3000)
        after = page.evaluate("() => [window.__lcCounterFrames, window.lcQuietTimers.runs]")
        assert after[1] - before[1] >= 2, (before, after)  # the counters still run, once a second each
        assert after[0] == 0, (before, after)
    finally:
        context.close()


def test_a_new_chat_and_a_send_run_no_transition(page, app):
    """New chat unselects the conversation in the sidebar, a send selects the new one and shows the reply's
    frame while the engine computes the first tokens; nothing of it may ease in over several frames
    (Gradio's theme gives the sidebar's labels 0.2 s colour transitions, ~11 frames each time;
    assets/ui.css turns transitions off)."""
    open_conversation(page, app)
    set_setting(page, "lc-max-tokens", 16)
    new_chat(page)
    send(page, "Say hello.")  # a conversation selected in the sidebar
    page.wait_for_timeout(500)
    page.evaluate("""() => {
      window.__lcAnims = new Set();
      window.__lcWatch = setInterval(() => {
        for (const a of document.getAnimations()) window.__lcAnims.add(`${a.constructor.name} ${a.transitionProperty || a.animationName} ${a.effect && a.effect.target && a.effect.target.tagName}`);
      }, 5);
    }""")
    new_chat(page)
    page.wait_for_timeout(300)
    send(page, "Say goodbye.")
    page.wait_for_timeout(500)
    running = page.evaluate("() => { clearInterval(window.__lcWatch); return [...window.__lcAnims]; }")
    assert running == []


def test_a_streaming_reply_moves_nothing_outside_the_thread_and_the_caret_stays_lit(page, app):
    """The conversation's column keeps its height while a reply grows in it (a growing column moved the message
    box and laid out the whole page at each update), and the message box's caret does not blink while the
    reply is written (each blink is a frame drawn on the engine's cores); it blinks again afterwards."""
    open_conversation(page, app)
    set_setting(page, "lc-max-tokens", 200)
    new_chat(page)
    page.evaluate("""() => {
      const box = () => document.querySelector('#lc-input textarea');
      const g = window.__lcWriting = {thread: new Set(), input: new Set(), caret: new Set(), idle: getComputedStyle(box()).caretAnimation};
      window.__lcWritingObs = new MutationObserver(() => {
        if (!document.querySelector('#lc-live .lc-streaming .lc-body')) return;
        g.thread.add(document.querySelector('#lc-thread').getBoundingClientRect().height);
        g.input.add(Math.round(box().getBoundingClientRect().top));
        g.caret.add(getComputedStyle(box()).caretAnimation);
      });
      window.__lcWritingObs.observe(document.querySelector('#lc-live'), {subtree: true, childList: true, characterData: true});
    }""")
    send(page, "Tell me a long story.")
    seen = page.evaluate("() => { window.__lcWritingObs.disconnect(); const g = window.__lcWriting;"
                         " return {thread: [...g.thread], input: [...g.input], caret: [...g.caret], idle: g.idle}; }")
    assert seen["caret"] == ["manual"] and seen["idle"] == "auto", seen
    assert len(seen["thread"]) == 1 and len(seen["input"]) == 1, seen
    after = page.evaluate("() => [getComputedStyle(document.querySelector('#lc-input textarea')).caretAnimation,"
                          " document.querySelector('#lc-thread').getBoundingClientRect().height]")
    assert after == ["auto", seen["thread"][0]]


def test_the_side_column_scrolls_by_itself_and_the_reply_stays_in_view(page, app):
    """With the settings and the memory panel open, the side column is longer than the window: it scrolls by
    itself, and the conversation, the reply being written and the message box stay in view (when the whole
    page scrolled, typing into a setting low in the column took them out of view)."""
    open_conversation(page, app)
    new_chat(page)
    set_setting(page, "lc-max-tokens", 200)  # low in the settings: Playwright scrolls it into view to type
    open_memory_panel(page)
    side = page.evaluate("() => { const s = document.querySelector('#lc-side'); return [s.scrollHeight, s.clientHeight, s.scrollTop]; }")
    assert side[0] > side[1] and side[2] > 0, side  # the column is longer than the window, and scrolled
    page.evaluate("""() => {
      const inView = (sel) => { const e = document.querySelector(sel); if (!e) return null; const r = e.getBoundingClientRect();
                                return r.top >= 0 && r.bottom <= innerHeight && r.left >= 0 && r.right <= innerWidth; };
      const seen = window.__lcInView = [];
      window.__lcInViewObs = new MutationObserver(() => {
        if (!document.querySelector('#lc-live .lc-streaming .lc-body')) return;
        seen.push([scrollY, inView('#lc-live .lc-streaming .lc-stats'), inView('#lc-input textarea'), inView('#lc-memory .lc-grid-canvas')]);
      });
      window.__lcInViewObs.observe(document.querySelector('#lc-live'), {subtree: true, childList: true, characterData: true});
    }""")
    send(page, "Tell me a long story.")
    seen = page.evaluate("() => { window.__lcInViewObs.disconnect(); return window.__lcInView; }")
    assert seen and all(s == [0, True, True, True] for s in seen), seen


def test_settings_presets_and_the_system_prompt(page, app):
    from localchat.ui.presets import Presets

    open_conversation(page, app)
    new_chat(page)
    page.locator("#lc-settings").get_by_text("Settings", exact=True).click()
    page.locator("#lc-preset input").click()
    page.get_by_role("option", name="Precise (greedy)").click()
    page.wait_for_function("() => document.querySelector('#lc-temperature input').value === '0'")
    set_setting(page, "lc-top-k", 5)
    set_setting(page, "lc-min-p", 0.1)
    set_setting(page, "lc-repetition-penalty", 1.2)
    set_setting(page, "lc-stop-strings", "THE END")
    set_setting(page, "lc-seed", 42)
    set_setting(page, "lc-system", "You are terse.")
    set_setting(page, "lc-preset-name", "My terse preset")
    page.locator("#lc-preset-save").click()
    assert eventually(lambda: "My terse preset" in Presets(app.presets_path).names())
    saved = Presets(app.presets_path).get("My terse preset")  # a restart reads the same file
    assert (saved["top_k"], saved["min_p"], saved["repetition_penalty"], saved["stop"], saved["system_prompt"]) == (5, 0.1, 1.2, "THE END", "You are terse.")
    set_setting(page, "lc-max-tokens", 8)
    set_setting(page, "lc-repetition-penalty", 1.0)
    send(page, "Hello with a system prompt")
    conv = app.store.list_conversations()[0]
    assert conv.system_prompt == "You are terse."
    reply = app.store.current_path(conv.id)[-1]
    assert reply.sampling["top_k"] == 5 and reply.sampling["stop"] == ["THE END"] and reply.sampling["seed"] == 42
    page.reload()
    page.locator("#lc-settings").get_by_text("Settings", exact=True).click()
    page.locator("#lc-preset input").click()
    assert page.get_by_role("option", name="My terse preset").count() == 1
    shot(page, "presets")


# ------------------------------------------------------------------ memory panel and tabs
THREE_TAILS_PARTED = """() => {
  const data = window.lcMemory && window.lcMemory();
  if (!data || data.seqs.length !== 3 || document.querySelectorAll('#lc-memory .lc-seq').length !== 3) return false;
  const tables = data.seqs.map(s => new Set(s.blocks));
  const holders = b => tables.filter(t => t.has(b)).length;
  return tables.every(t => [...t].some(b => holders(b) === 1));
}"""


def test_memory_panel_tells_the_story_of_a_compare_of_three(page, app):
    open_conversation(page, app)
    new_chat(page)
    open_memory_panel(page)
    set_setting(page, "lc-temperature", 1.0)
    set_setting(page, "lc-n", 3)
    set_setting(page, "lc-max-tokens", 420)
    history = "Here is a long shared history for three samples. " * 8
    box = page.locator("#lc-input textarea")
    box.fill(history)
    box.press("Enter")
    # the panel may first draw the three samples in the instant after the fork, before each has written its
    # first token into a block of its own: wait for the snapshot in which all three tails have parted
    page.wait_for_function(THREE_TAILS_PARTED, timeout=TIMEOUT_MS)
    data = page.evaluate("() => window.lcMemory()")
    seqs = data["seqs"]
    assert [s["label"].rsplit(" · ", 1)[1] for s in seqs] == ["sample 1", "sample 2", "sample 3"]
    assert all("«Here is a long shared" in s["label"] for s in seqs)
    tables = [set(s["blocks"]) for s in seqs]
    common = tables[0] & tables[1] & tables[2]
    assert len(common) >= 4  # the history's full blocks, stored once for the three samples
    assert all(t - common for t in tables) and not (tables[0] - common) & (tables[1] - common)  # three diverging tails
    assert data["figures"]["sharing_savings"] > 0.2
    assert any(e[1] == "fork" for e in data["timeline"]["events"]), data["timeline"]
    metas = page.locator("#lc-memory .lc-seq-meta").all_inner_texts()
    assert all(f"({len(common)} shared)" in t or "shared)" in t for t in metas)
    # hovering a shared block shows who holds it and its text
    block = min(common)
    canvas = page.locator("#lc-memory .lc-grid-canvas")
    cols, cell = int(canvas.get_attribute("data-cols")), int(canvas.get_attribute("data-cell"))
    canvas.hover(position={"x": (block % cols) * cell + cell / 2, "y": (block // cols) * cell + cell / 2})
    tip = page.locator("#lc-memory .lc-tip")
    tip.get_by_text("ref count 3").wait_for()
    page.wait_for_function("() => document.querySelector('#lc-memory .lc-tip').textContent.includes('text:')")
    page.locator("#lc-memory .lc-seq").nth(1).click()  # highlight one sequence's blocks
    assert page.locator("#lc-memory .lc-seq.lc-active").count() == 1
    shot(page, "memory_during_compare_of_three")

    wait_replies(page, 3)
    page.wait_for_function("() => window.lcMemory() && window.lcMemory().seqs.length === 0", timeout=TIMEOUT_MS)
    after = page.evaluate("() => window.lcMemory()")
    assert after["figures"]["blocks_used"] == 0 and after["figures"]["blocks_cached"] >= len(common)
    assert after["states"].count("c") == after["figures"]["blocks_cached"]
    legend = page.locator("#lc-memory .lc-tl-legend")
    assert int(legend.get_attribute("data-forks")) >= 2 and int(legend.get_attribute("data-cows")) >= 1
    assert int(page.locator("#lc-memory .lc-tl-canvas").get_attribute("data-samples")) >= 2
    page.get_by_text("No live sequences").wait_for()
    shot(page, "memory_after_compare_of_three")


def test_a_poll_changes_the_panel_in_place(page, app):
    """The panel polls once a second, also while a reply streams: a poll sets what changed in the elements
    already there, and an idle pool's grid is not drawn again (a pixel painted on it survives)."""
    open_conversation(page, app)
    new_chat(page)
    set_setting(page, "lc-max-tokens", 8)
    send(page, "Fill a few blocks")
    open_memory_panel(page)
    page.wait_for_function("() => window.lcMemory() && window.lcMemory().seqs.length === 0", timeout=TIMEOUT_MS)
    # one more poll first: the panel's first draw may come before the column settles (a scrollbar appears), and
    # a grid whose width changed is rightly drawn again
    page.evaluate("() => { window.__settle = window.lcMemory().timeline.now; }")
    page.wait_for_function("() => window.lcMemory().timeline.now > window.__settle + 0.5", timeout=TIMEOUT_MS)
    page.evaluate("""() => {
      const q = (sel) => document.querySelector('#lc-memory ' + sel);
      window.__panel = {grid: q('.lc-grid-canvas'), timeline: q('.lc-tl-canvas'), used: q('[data-figure=blocks_used] dd'), now: window.lcMemory().timeline.now};
      const g = window.__panel.grid.getContext('2d');
      g.setTransform(1, 0, 0, 1, 0, 0); g.globalAlpha = 1; g.fillStyle = 'rgb(1, 2, 3)'; g.fillRect(0, 0, 1, 1);
    }""")
    page.wait_for_function("() => window.lcMemory().timeline.now > window.__panel.now + 1.5", timeout=TIMEOUT_MS)  # two polls later
    kept = page.evaluate("""() => {
      const q = (sel) => document.querySelector('#lc-memory ' + sel), was = window.__panel;
      return {grid: q('.lc-grid-canvas') === was.grid, timeline: q('.lc-tl-canvas') === was.timeline,
              used: q('[data-figure=blocks_used] dd') === was.used,
              pixel: [...was.grid.getContext('2d').getImageData(0, 0, 1, 1).data]};
    }""")
    assert kept == {"grid": True, "timeline": True, "used": True, "pixel": [1, 2, 3, 255]}, kept


_GRID_AGREES = """() => {
  const canvas = document.querySelector('#lc-memory .lc-grid-canvas'), d = window.lcMemory();
  const cols = +canvas.dataset.cols, cell = +canvas.dataset.cell, g = canvas.getContext('2d');
  const hex = (x) => '#' + [...g.getImageData((x % cols) * cell + 1, Math.floor(x / cols) * cell + 1, 1, 1).data].slice(0, 3).map((v) => v.toString(16).padStart(2, '0')).join('');
  const want = {f: '#d7dce3', c: '#5aa9e6'};
  const wrong = [];
  for (let b = 0; b < d.states.length; b++) {
    const got = hex(b), st = d.states[b];
    if (want[st] ? got !== want[st] : (got === want.f || got === want.c || got === '#000000')) wrong.push([b, st, got]);
  }
  return wrong;
}"""


def test_a_poll_paints_only_the_grid_cells_that_changed(page, app):
    """While a reply fills blocks, a poll paints only the grid's cells whose state changed (not all of the
    pool's), and the grid then still shows every block's state: free and cached in their colours, used in a
    sequence's (or shared) colour, during the reply and after it, when its blocks go back to the cache."""
    open_conversation(page, app)
    new_chat(page)
    open_memory_panel(page)
    page.wait_for_function("() => window.lcMemory() && document.querySelector('#lc-memory .lc-grid-canvas[data-painted]')",
                           timeout=TIMEOUT_MS)
    page.evaluate("""() => {
      const seen = window.__lcPainted = [];
      window.__lcPaintObs = new MutationObserver(() => {
        const c = document.querySelector('#lc-memory .lc-grid-canvas');
        if (c && document.documentElement.classList.contains('lc-writing')) seen.push(+c.dataset.painted);
      });
      window.__lcPaintObs.observe(document.querySelector('#lc-memory'), {subtree: true, attributes: true, attributeFilter: ['data-painted']});
    }""")
    set_setting(page, "lc-max-tokens", 450)
    send(page, "Tell me a long story.")
    painted = page.evaluate("() => { window.__lcPaintObs.disconnect(); return window.__lcPainted; }")
    cells = page.evaluate("() => window.lcMemory().states.length")
    assert painted and 0 < min(painted) < cells // 4, (painted, cells)
    page.evaluate("() => { window.__now = window.lcMemory().timeline.now; }")
    page.wait_for_function("() => window.lcMemory().timeline.now > window.__now + 1.5", timeout=TIMEOUT_MS)  # polls after the end
    page.wait_for_timeout(300)
    assert page.evaluate(_GRID_AGREES) == []


def test_the_panel_polls_only_while_it_is_in_view(page, app):
    """An open panel scrolled out of the side column's view asks the server for nothing (each poll costs the
    engine's cores a request and a drawing); scrolled back into view, it polls and draws again."""
    open_conversation(page, app)
    set_setting(page, "lc-max-tokens", 64)  # the settings open: the panel below them is out of view at the top
    page.locator("#lc-memory-acc").get_by_text("Memory (KV cache blocks)").click()
    page.locator("#lc-memory .lc-grid-canvas").wait_for()
    page.wait_for_function("() => window.lcMemory() && window.lcMemory().timeline.now", timeout=TIMEOUT_MS)
    page.evaluate("() => { document.querySelector('#lc-side').scrollTop = 0; }")
    page.wait_for_timeout(1200)  # a poll already on its way lands
    assert page.evaluate("() => document.querySelector('#lc-memory').getBoundingClientRect().top > innerHeight")
    before = page.evaluate("() => window.lcMemory().timeline.now")
    page.wait_for_timeout(2500)
    assert page.evaluate("() => window.lcMemory().timeline.now") == before
    page.evaluate("() => document.querySelector('#lc-memory .lc-grid-canvas').scrollIntoView({block: 'nearest'})")
    page.wait_for_function(f"() => window.lcMemory().timeline.now > {before}", timeout=3000)


def test_while_a_reply_streams_the_open_panel_comes_with_it_and_does_not_poll(page, app, monkeypatch):
    """An open panel's data rides on the reply's own stream (localchat/ui/live.py), drawn in the frames that
    show the text: while the reply streams the panel asks the server nothing and still moves on, and after
    the reply it polls again."""
    engine = app.service.driver.engine
    step = engine.step

    def slow_step():  # a model of this project's real speed: the tiny one writes its 500 tokens in ~1 s
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    open_conversation(page, app)
    new_chat(page)
    open_memory_panel(page)
    page.wait_for_function("() => window.lcMemory() && window.lcMemory().timeline.now", timeout=TIMEOUT_MS)
    page.evaluate("""() => {
      const server = window.lcParts.mem.server, ask = server.memory;
      const log = window.__lcPanel = {polls: [], nows: [], writing: []};
      const writing = () => document.documentElement.classList.contains('lc-writing');
      server.memory = (arg) => { log.polls.push(writing()); return ask(arg); };
      log.timer = setInterval(() => {
        const now = window.lcMemory().timeline.now;
        if (writing()) { log.writing.push(performance.now()); if (!log.nows.includes(now)) log.nows.push(now); }
      }, 50);
    }""")
    set_setting(page, "lc-temperature", 0)  # greedy: the tiny model does not end its reply early by chance
    set_setting(page, "lc-max-tokens", 400)
    send(page, "Tell me a very long story")
    seen = page.evaluate("() => { clearInterval(window.__lcPanel.timer); return window.__lcPanel; }")
    wrote_s = (seen["writing"][-1] - seen["writing"][0]) / 1000
    assert wrote_s > 2.5, wrote_s  # long enough for the panel's polls to show
    assert len(seen["nows"]) >= wrote_s - 1, seen  # the panel moved on about once a second while the reply streamed
    assert seen["polls"].count(True) <= 1, seen  # one may leave before the stream's first data comes
    # after the reply the panel polls again, once a second
    page.evaluate("() => { window.__now = window.lcMemory().timeline.now; window.__polls = window.__lcPanel.polls.length; }")
    page.wait_for_function("() => window.__lcPanel.polls.length >= window.__polls + 2 && window.lcMemory().timeline.now > window.__now",
                           timeout=TIMEOUT_MS)


def test_two_tabs_share_the_engine_each_with_its_own_conversation(browser, app):
    contexts = [browser.new_context(viewport={"width": 1400, "height": 950}) for _ in range(2)]
    try:
        pages = [ctx.new_page() for ctx in contexts]
        for i, pg in enumerate(pages):
            pg.set_default_timeout(TIMEOUT_MS)
            open_conversation(pg, app)
            new_chat(pg)
            set_setting(pg, "lc-max-tokens", 300)
        open_memory_panel(pages[0])
        for i, pg in enumerate(pages):
            box = pg.locator("#lc-input textarea")
            box.fill(f"Tab {i} speaking")
            box.press("Enter")
        pages[0].wait_for_function(
            "() => window.lcMemory && window.lcMemory() && new Set(window.lcMemory().seqs.map(s => s.owner)).size === 2")
        labels = [s["label"] for s in pages[0].evaluate("() => window.lcMemory().seqs")]
        assert any("Tab 0" in x for x in labels) and any("Tab 1" in x for x in labels)
        shot(pages[0], "two_tabs_memory")
        for i, pg in enumerate(pages):
            wait_replies(pg, 1)
            assert shown(pg)[0] == f"Tab {i} speaking" and len(shown(pg)) == 2
        ids = [pg.locator("#lc-chat .lc-conv").get_attribute("data-conv") for pg in pages]
        assert ids[0] != ids[1]
    finally:
        for ctx in contexts:
            ctx.close()


def test_a_pool_of_tens_of_thousands_of_blocks_is_drawn_on_a_canvas(page, app):
    open_conversation(page, app)
    open_memory_panel(page)
    page.locator("#lc-memory .lc-grid-canvas").wait_for()
    # The panel's own data, grown to 40,000 blocks: 30,000 cached, eight live sequences of 250 blocks
    # (the first 100 shared by all), the rest free; drawn the way a poll draws it, and read back in the
    # same turn of the page's event loop (the panel's own once-a-second poll would redraw the real pool).
    seen = page.evaluate("""() => {
      const n = 40000, base = window.lcMemory();
      const seqs = [...Array(8).keys()].map((i) => ({seq: i, owner: 'r', label: `sample ${i + 1}`, tokens: 4000, status: 'running',
        blocks: [...Array(100).keys()].map((b) => 30000 + b).concat([...Array(150).keys()].map((b) => 30100 + i * 150 + b))}));
      const states = 'c'.repeat(30000) + 'u'.repeat(1300) + 'f'.repeat(n - 31300);
      const data = {...base, states, seqs, figures: {...base.figures, blocks_total: n, blocks_used: 1300, blocks_cached: 30000}};
      const root = document.querySelector('#lc-memory .lc-mem');
      root.dataset.panel = JSON.stringify(data);
      const t0 = performance.now();
      window.lcChanged('mem');
      const ms = performance.now() - t0;
      const canvas = document.querySelector('#lc-memory .lc-grid-canvas'), r = canvas.getBoundingClientRect();
      canvas.dispatchEvent(new MouseEvent('mousemove', {clientX: r.right - 2, clientY: r.bottom - 2}));
      return {ms, blocks: canvas.dataset.blocks, per: +canvas.dataset.per, height: r.height,
              seqs: document.querySelectorAll('#lc-memory .lc-seq').length,
              tip: document.querySelector('#lc-memory .lc-tip').textContent};
    }""")
    assert seen["blocks"] == "40000" and seen["seqs"] == 8, seen
    assert seen["height"] <= 300  # the whole pool in view: cells of a pixel or more, or several blocks a cell
    assert "free" in seen["tip"], seen  # the last cell of the pool
    shot(page, "memory_40000_blocks")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "memory_40000_blocks.json").write_text(json.dumps({"blocks": 40000, "blocks_per_cell": seen["per"], "draw_ms": seen["ms"]}))


def test_named_endpoints_for_scripts(app, browser):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    out = client.predict(text="Hi from the API", max_tokens=6, temperature=0, api_name="/send")
    assert out["texts"][0] and len(app.store.current_path(out["conversation_id"])) == 2
    again = client.predict(message_id=out["message_ids"][0], max_tokens=6, n=2, api_name="/regenerate")
    assert len(again["message_ids"]) == 2 and app.store.siblings(again["message_ids"][0]).count == 3
    beams = client.predict(text="Beams from the API", max_tokens=4, beam_width=2, temperature=0, api_name="/send")
    assert len(beams["texts"]) == 2
