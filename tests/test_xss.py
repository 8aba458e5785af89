"""Nothing a model, a user or an imported file writes runs in the page. A corpus of markup (raw HTML,
Markdown, SVG, MathML, entities, code fences: tests/helpers/xss_corpus.py) goes in through every way
text reaches the page: model output (an engine that writes each payload, helpers/scripted.py, streamed
and finished, one sample and several side by side), the user's messages, conversation titles (from the
first message, and renamed), `localchat chats import` (messages, title, system prompt) and the memory
panel's block text. In Debian's Chromium: no script runs (alert/confirm/prompt are recorded), no active
element appears at any moment (a MutationObserver checks every node added), nothing is requested from
another host, the page sends a Content-Security-Policy, and the browser reports no violation of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import skip_or_fail
from localchat.bench.page import set_setting
from helpers.tiny_app import HERE, AppProcess
from helpers.xss_corpus import corpus

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT_MS = 90_000

# Runs before the page's own scripts: record dialogs, CSP violations, and every element that could be
# active, whenever it appears. `__lcActive(el)` says why an element is active ('' if it is not).
WATCH = r"""
(() => {
  const hits = window.__xssHits = [];
  const active = window.__xssActive = [];
  const csp = window.__cspViolations = [];
  for (const name of ['alert', 'confirm', 'prompt', 'print']) window[name] = (m) => { hits.push(name + ':' + m); };
  document.addEventListener('securitypolicyviolation', (e) => csp.push(e.violatedDirective + ' ' + e.blockedURI));
  const NEVER = new Set(['IFRAME', 'FRAME', 'FRAMESET', 'OBJECT', 'EMBED', 'APPLET', 'MATH', 'PORTAL']);
  const ROOTS = '#lc-chat, #lc-live, #lc-compare, #lc-overview, #lc-status, #lc-memory, #lc-conversations, #lc-title';
  const PAYLOAD = /alert\(\d+\)|xss\.invalid/;
  // Tags that markdown (localchat/ui/markdown.py) may produce inside a message body; anything else is markup that got through.
  const BODY_OK = new Set(['P', 'BR', 'STRONG', 'EM', 'CODE', 'PRE', 'BLOCKQUOTE', 'UL', 'OL', 'LI', 'H1', 'H2', 'H3',
    'H4', 'H5', 'H6', 'HR', 'TABLE', 'THEAD', 'TBODY', 'TR', 'TH', 'TD', 'S', 'DEL', 'SPAN', 'DIV']);
  const URL_ATTRS = ['href', 'src', 'action', 'formaction', 'xlink:href', 'data', 'poster', 'background', 'srcdoc', 'ping'];
  const BAD_URL = /^(javascript|vbscript|data:text\/html)/;
  window.__lcActive = (el) => {
    if (!(el instanceof Element)) return '';
    const tag = el.tagName.toUpperCase();
    if (NEVER.has(tag)) return 'a <' + tag.toLowerCase() + '> element';
    // Gradio's page has <base href="./">: a base is active when it points elsewhere or sits in our content.
    if (tag === 'BASE' && (el.closest(ROOTS) || !el.href.startsWith(location.origin))) return 'a <base> element';
    // Gradio's own scripts come from this origin and hold no payload; any other script is one that got in.
    if (tag === 'SCRIPT' && (el.closest(ROOTS) || PAYLOAD.test(el.textContent) ||
        (el.src && !el.src.startsWith(location.origin)))) return 'a script';
    if (tag === 'META' && el.getAttribute('http-equiv')) return 'a meta refresh';
    for (const a of el.attributes) {
      if (a.name.toLowerCase().startsWith('on')) return 'an event handler ' + a.name;
      if (URL_ATTRS.includes(a.name.toLowerCase())) {
        const v = a.value.replace(/[\s\u0000-\u001f]/g, '').toLowerCase();
        if (BAD_URL.test(v) || v.includes('xss.invalid')) return a.name + '=' + a.value;
      }
    }
    if ((tag === 'STYLE' || tag === 'LINK') && (el.closest(ROOTS) || PAYLOAD.test(el.outerHTML))) return 'a payload style';
    if (el.style && /url\(/.test(el.getAttribute('style') || '')) return 'a style that loads a URL';
    const body = el.parentElement && el.parentElement.closest('.lc-body');
    if (body && !BODY_OK.has(tag)) return 'a <' + tag.toLowerCase() + '> inside a message';
    if (body && [...el.attributes].some((a) => !['class', 'start', 'style'].includes(a.name))) return 'an attribute inside a message';
    return '';
  };
  const check = (node) => {
    if (!(node instanceof Element)) return;
    for (const el of [node, ...node.querySelectorAll('*')]) {
      const why = window.__lcActive(el);
      if (why) active.push(why + ': ' + el.outerHTML.slice(0, 200));
    }
  };
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === 'attributes') check(r.target);
      for (const n of r.addedNodes || []) check(n);
    }
  }).observe(document, {childList: true, subtree: true, attributes: true});
})();
"""

SCAN = "() => [...document.querySelectorAll('*')].map((el) => [window.__lcActive(el), el.outerHTML.slice(0, 200)]).filter((x) => x[0])"


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


def export_of(payloads: list[str]) -> dict:
    """A conversation file holding every payload as a question and as an answer, its title and system prompt."""
    messages, parent = [], None
    for i, text in enumerate(payloads):
        for role in ("user", "assistant"):
            messages.append({"id": len(messages) + 1, "parent": parent, "role": role, "content": text, "created_at": float(i)})
            parent = len(messages)
    return {"format": "localchat.conversation", "version": 1,
            "conversation": {"title": payloads[1], "created_at": 0.0, "updated_at": 0.0, "system_prompt": payloads[0],
                             "current_leaf": parent},
            "messages": messages}


def wait_reply(page, count: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#lc-chat .lc-msg.lc-assistant').length >= n && !document.querySelector('#lc-live .lc-live')",
        arg=count, timeout=TIMEOUT_MS)


def new_chat(page) -> None:
    page.locator("#lc-new").click()
    page.locator('#lc-chat .lc-conv[data-conv=""]').wait_for(state="attached")


def send(page, text: str, replies: int = 1) -> None:
    page.locator("#lc-input textarea").fill(text)
    page.locator("#lc-send").click()
    wait_reply(page, replies)


def set_samples(page, n: int) -> None:
    set_setting(page, "lc-n", n)


def findings(page) -> dict:
    return {"script ran": page.evaluate("window.__xssHits"), "active elements": page.evaluate("window.__xssActive"),
            "active now": page.evaluate(SCAN), "CSP violations": page.evaluate("window.__cspViolations")}


def test_no_payload_runs_or_becomes_active_anywhere_in_the_page(browser, tmp_path):
    from localchat.cli import main

    payloads = corpus()
    assert len(payloads) >= 40
    db = tmp_path / "chats.db"
    export = tmp_path / "payloads.json"
    export.write_text(json.dumps(export_of(payloads)), encoding="utf-8")
    assert main(["chats", "import", str(export), "--db", str(db)]) == 0
    script = tmp_path / "script.json"
    script.write_text(json.dumps(payloads), encoding="utf-8")
    app = AppProcess([str(HERE / "tiny_app.py"), "--db", str(db), "--payloads", str(script)], tmp_path, module="")
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(WATCH)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    foreign, errors = [], []
    page.on("request", lambda r: None if r.url.startswith((app.url, "data:", "blob:")) else foreign.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append("dialog " + d.message), d.dismiss()))
    try:
        response = page.goto(app.url)
        policy = response.headers.get("content-security-policy", "")
        assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "object-src 'none'" in policy
        page.locator('#lc-chat .lc-conv:not([data-ctx="0"])').wait_for(state="attached")
        assert findings(page) == {"script ran": [], "active elements": [], "active now": [], "CSP violations": []}

        # `chats import`: every payload as a message, the title and the system prompt; then a reply to it.
        page.goto(app.url + "?c=1")
        page.locator('#lc-chat .lc-conv[data-conv="1"]').wait_for(state="attached")
        assert page.locator("#lc-chat .lc-msg .lc-body").count() == 2 * len(payloads)
        assert page.locator("#lc-chat .lc-msg.lc-user .lc-body").first.text_content().strip() == payloads[0].strip()
        assert page.locator("#lc-title input, #lc-title textarea").first.input_value() == payloads[1]
        send(page, "and once more [[payload 2]]", replies=len(payloads) + 1)

        # Model output and user text, each payload in a conversation of its own (its title is the payload).
        for i, text in enumerate(payloads):
            new_chat(page)
            send(page, f"{text}\n\n[[payload {i}]]")
            body = page.locator("#lc-chat .lc-msg.lc-assistant .lc-body").last
            assert body.text_content().strip()  # the payload shows, as text
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "xss_payloads.png"), full_page=True)

        # Several samples side by side, streamed into cards, then compared.
        set_samples(page, 3)
        new_chat(page)
        send(page, f"{payloads[44]}\n\n[[payload 44]]", replies=3)
        set_samples(page, 1)

        # A title renamed to a payload.
        title = page.locator("#lc-title input, #lc-title textarea").first
        title.fill(payloads[5])
        page.locator("#lc-rename").click()
        page.locator("#lc-conversations").get_by_text(payloads[5][:20]).first.wait_for()

        # The memory panel: every block's text as the tooltip shows it (payload tokens sit in the cache).
        page.locator("#lc-memory-acc").get_by_text("Memory", exact=False).first.click()
        canvas = page.locator("#lc-memory canvas.lc-grid-canvas").first
        canvas.wait_for()
        page.wait_for_function("() => Number(document.querySelector('#lc-memory canvas.lc-grid-canvas').dataset.cols) > 0")
        cell, cols = (float(canvas.get_attribute(f"data-{k}")) for k in ("cell", "cols"))
        tip = page.locator("#lc-memory .lc-tip").first
        shown = []
        for b in range(16):  # the first blocks: the imported conversation's tokens, payloads among them
            canvas.hover(position={"x": (b % cols) * cell + cell / 2, "y": (b // cols) * cell + cell / 2})
            page.wait_for_timeout(200)
            shown.append(tip.text_content() or "")
            assert tip.evaluate("(t) => t.children.length") == 0  # text only, never markup
        assert any("text:" in s and ("alert" in s or "<" in s) for s in shown), shown[:5]
        page.screenshot(path=str(ARTIFACTS / "xss_memory_panel.png"), full_page=True)

        found = findings(page)
        assert found == {"script ran": [], "active elements": [], "active now": [], "CSP violations": []}
        assert foreign == []  # nothing fetched from another host
        assert errors == []

        # The watch itself works: markup put into a message as HTML (what escaping prevents) is caught.
        page.evaluate("() => { const d = document.createElement('div'); d.className = 'lc-body';"
                      " document.querySelector('#lc-chat').append(d);"
                      " d.innerHTML = '<img src=x onerror=alert(999)><a href=javascript:alert(998)>x</a>'; }")
        page.wait_for_function("() => window.__xssHits.length > 0")
        caught = findings(page)
        assert caught["script ran"] == ["alert:999"]
        assert any("onerror" in a for a in caught["active elements"])
        assert any("javascript:" in why for why, _html in caught["active now"])
    finally:
        context.close()
        assert app.stop() == 0
