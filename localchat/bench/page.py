"""`localchat bench page`: a reply as it streams in the app's page, against `localchat generate`.

The figure is what a person sees: the tokens of the final text over the time from the reply's first to
its last change, in the page (a MutationObserver in Chromium stamps every change of the reply) and in
`generate`'s streamed output (stamped as it arrives on the pipe), on the same prompt, greedy, in the
same run, with the memory panel closed and open; each row is the ratio of the medians, and the runs take
turns, a `generate` before every page reply and one after the last (run_order; the JSON also has each page
reply against the two runs beside it: paired_ratios). Also measured in the page: a click on a branch until
it is shown, a regenerate until its first token with a 1,500-token history (all of it in the prefix
cache), and a branch switch followed by a new message until its first token.

For a registry model the app and `generate` run as the user runs them (`localchat app`, `localchat
generate`, each in its own processes); for the bench's tiny test model (no registry entry) both run
in this process, which exercises the same page but measures nothing meaningful.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localchat.bench.report import Report
from localchat.bench.workloads import BenchContext, Sizes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a map inside a bottle, "
          "with several chapters, dialogue and a surprising ending.")
FILLER = ("The engine keeps the key and value vectors of every token in fixed-size blocks, and a block table "
          "maps each sequence onto them, so branches of a conversation share their common history. ")


@dataclass
class Growth:
    """One reply as it grew: its final text and when it first and last changed (seconds)."""

    text: str
    first: float
    last: float
    tokens: int = 0

    @property
    def tok_s(self) -> float:
        span = self.last - self.first
        return self.tokens / span if span > 0 else 0.0


# ---- the baseline: `localchat generate` --------------------------------------------------------


def generate_growth(cmd: list[str], env: dict | None = None, timeout: float = 900.0) -> Growth:
    """Run `localchat generate` (streaming text) and stamp each chunk of its output as it arrives."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    chunks: list[tuple[float, bytes]] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        data = os.read(fd, 65536)
        if not data:
            break
        chunks.append((time.perf_counter(), data))
    proc.wait(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}")
    text, first, last = "", None, None
    for stamp, data in chunks:
        text += data.decode("utf-8", errors="replace")
        if text.strip():
            first = stamp if first is None else first
            if data.strip():  # the final newline `generate` prints is not part of the reply
                last = stamp
    if first is None:
        raise RuntimeError("generate printed no text")
    return Growth(text.rstrip("\n"), first, last)


def engine_growth(engine, prompt: str, max_tokens: int) -> Growth:
    """The same as `generate` on an engine in this process (the tiny test model's baseline)."""
    from localchat.engine import SamplingParams

    engine.add_request(messages=[{"role": "user", "content": prompt}],
                       params=SamplingParams(temperature=0.0, max_tokens=max_tokens))
    text, first, last = "", None, None
    while engine.has_unfinished():
        for out in engine.step():
            delta = out.outputs[0].delta_text
            if delta:
                now = time.perf_counter()
                text += delta
                first = now if first is None else first
                last = now
    return Growth(text, first or 0.0, last or 0.0)


# ---- the page ----------------------------------------------------------------------------------

# Stamps every change of the reply's text as the page shows it: in the reply being written, and then in
# the chat when the reply is saved (a short reply can be over before the page starts following it).
_OBSERVE = """() => {
  const g = window.__lcGrowth = {changes: [], last: '', out_of_view: 0};
  const inView = (node) => {
    const r = node.getBoundingClientRect();
    return r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth;
  };
  const known = new Set([...document.querySelectorAll('#lc-chat .lc-msg.lc-assistant')].map((m) => m.dataset.id));
  const liveBody = () => document.querySelector('#lc-live .lc-streaming .lc-body');
  const current = () => {
    const body = liveBody();
    if (body) return body.textContent;
    const fresh = [...document.querySelectorAll('#lc-chat .lc-msg.lc-assistant:not([hidden])')].filter((m) => !known.has(m.dataset.id));
    return fresh.length ? fresh[fresh.length - 1].querySelector('.lc-body').textContent : null;
  };
  if (window.__lcObserver) window.__lcObserver.disconnect();
  window.__lcObserver = new MutationObserver(() => {
    const text = current();
    if (text === null) return;
    const norm = text.replace(/\\s+/g, ' ').trim();
    if (norm === g.last) return;
    g.changes.push(performance.now());
    g.last = norm;
    const body = liveBody();
    if (body && !inView(body)) g.out_of_view += 1;
  });
  window.__lcObserver.observe(document.querySelector('#lc-thread') || document.body, {subtree: true, childList: true, characterData: true});
  document.addEventListener('keydown', (e) => { if (e.key === 'Enter') g.t0 = performance.now(); }, {capture: true, once: true});
  document.addEventListener('click', () => { g.t0 = performance.now(); }, {capture: true, once: true});
}"""

_BRANCH_CLICK = """async () => {
  const btn = document.querySelector('#lc-chat .lc-msg:not([hidden]) .lc-go[data-go]');
  if (!btn) return null;
  const target = document.querySelector(`#lc-chat .lc-msg[data-id="${btn.dataset.go}"]`);
  const t0 = performance.now();
  btn.click();
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return target.hidden ? null : performance.now() - t0;
}"""


# Resolves when the chat holds `count` replies and none is being written; fails after `timeout_ms`.
_WAIT_REPLIES = """({count, timeout_ms}) => new Promise((resolve, reject) => {
  const ready = () => document.querySelectorAll('#lc-chat .lc-msg.lc-assistant').length >= count && !document.querySelector('#lc-live .lc-live');
  if (ready()) return resolve(true);
  const watch = new MutationObserver(() => { if (ready()) { watch.disconnect(); clearTimeout(timer); resolve(true); } });
  const timer = setTimeout(() => { watch.disconnect(); reject(new Error(`no reply ${count} within ${timeout_ms} ms`)); }, timeout_ms);
  watch.observe(document.body, {subtree: true, childList: true});
})"""


def set_setting(page, elem_id: str, value) -> None:
    """Type `value` into a settings field as a person would (opening the settings first), and make sure
    it took: the settings' fields are mounted as the accordion first opens, and a value typed in that
    instant is replaced by the field's default; then it is typed again."""
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    if not field.is_visible():
        page.locator("#lc-settings").get_by_text("Settings", exact=True).click()
    for _ in range(5):
        field.fill(str(value))
        field.press("Tab")
        page.wait_for_timeout(100)
        if field.input_value() == str(value):
            return
    raise RuntimeError(f"the page's {elem_id} field would not keep {value!r} (it shows {field.input_value()!r})")


def open_memory_panel(page) -> None:
    """Open the (closed) memory panel and bring its grid into view, as a person watching it has it: the side
    column scrolls by itself, and an open panel out of view does not poll."""
    page.locator("#lc-memory-acc").get_by_text("Memory (KV cache blocks)").click()
    page.locator("#lc-memory .lc-grid-canvas").wait_for()
    page.evaluate("() => document.querySelector('#lc-memory .lc-grid-canvas').scrollIntoView({block: 'nearest'})")


class PageSession:
    """The app's page in Chromium, driven the way a person uses it."""

    def __init__(self, page) -> None:
        self.page = page
        self.panel_open = False

    def setting(self, elem_id: str, value) -> None:
        set_setting(self.page, elem_id, value)

    def memory_panel(self, *, open: bool) -> None:
        """Open or close the panel, and wait until it is drawn or gone (as a person sees it before typing)."""
        if open == self.panel_open:
            return
        if open:
            open_memory_panel(self.page)
        else:
            self.page.locator("#lc-memory-acc").get_by_text("Memory (KV cache blocks)").click()
            self.page.locator("#lc-memory .lc-grid-canvas").wait_for(state="hidden")
        self.panel_open = open

    def new_chat(self) -> None:
        self.page.locator("#lc-new").click()
        self.page.locator("#lc-chat .lc-conv.lc-empty").wait_for(state="attached")

    def replies(self) -> int:
        return self.page.locator("#lc-chat .lc-msg.lc-assistant").count()

    def wait_replies(self, count: int, timeout_s: float) -> None:
        # Woken by the page's own changes, not polled: Playwright's default polls on every animation frame,
        # which keeps the page drawing 60 frames a second, and even a poll every 250 ms is work on the
        # cores this suite measures that `generate`'s run does not have.
        self.page.evaluate(_WAIT_REPLIES, {"count": count, "timeout_ms": timeout_s * 1000})

    def newest_reply_stats(self) -> dict:
        """The engine's own figures for the newest reply, read from the line under it."""
        line = self.page.evaluate("""() => {
          const all = [...document.querySelectorAll('#lc-chat .lc-msg.lc-assistant')];
          all.sort((a, b) => +a.dataset.id - +b.dataset.id);
          const s = all.length ? all[all.length - 1].querySelector('.lc-stats') : null;
          return s ? s.textContent : '';
        }""")
        ttft = re.search(r"first token ([0-9.]+) s", line)
        hit = re.search(r"(\d+) of (\d+) prompt tokens", line)
        return {"engine_ttft_ms": 1000 * float(ttft.group(1)) if ttft else None,
                "prefix_hit_tokens": int(hit.group(1)) if hit else None, "prompt_tokens": int(hit.group(2)) if hit else None}

    def newest_reply_text(self) -> str:
        return self.page.evaluate("""() => {
          const all = [...document.querySelectorAll('#lc-chat .lc-msg.lc-assistant')];
          all.sort((a, b) => +a.dataset.id - +b.dataset.id);
          return all.length ? all[all.length - 1].dataset.src : '';
        }""")

    def send(self, text: str, timeout_s: float) -> dict:
        """Send a message and wait for its reply; returns the page's stamps (ms) of that reply."""
        before = self.replies()
        self.page.evaluate(_OBSERVE)
        box = self.page.locator("#lc-input textarea")
        box.fill(text)
        box.press("Enter")
        self.wait_replies(before + 1, timeout_s)
        return self.page.evaluate("() => window.__lcGrowth")

    def regenerate_last(self, timeout_s: float) -> dict:
        before = self.replies()
        self.page.evaluate(_OBSERVE)
        self.page.locator("#lc-chat .lc-msg.lc-assistant:not([hidden]) [data-act=regen]").last.click()
        self.wait_replies(before + 1, timeout_s)
        return self.page.evaluate("() => window.__lcGrowth")

    def branch_click_ms(self) -> float | None:
        return self.page.evaluate(_BRANCH_CLICK)


def _first_token_ms(stamps: dict) -> float | None:
    return stamps["changes"][0] - stamps["t0"] if stamps.get("changes") and stamps.get("t0") is not None else None


def page_growth(session: PageSession, prompt: str, timeout_s: float) -> Growth:
    session.new_chat()
    stamps = session.send(prompt, timeout_s)
    if not stamps["changes"]:
        raise RuntimeError("the reply never changed in the page")
    # A reply out of view is not painted, and a person reads what is in view: such a run measures neither.
    if stamps.get("out_of_view"):
        raise RuntimeError(f"the reply was out of view at {stamps['out_of_view']} of its {len(stamps['changes'])} changes")
    return Growth(session.newest_reply_text(), stamps["changes"][0] / 1000, stamps["changes"][-1] / 1000)


def history_text(tokenizer, tokens: int) -> str:
    """A user message of about `tokens` tokens (the templated prompt adds a few more)."""
    text = "Please summarise the following notes in one sentence.\n\n"
    while len(tokenizer.encode(text + FILLER, add_special_tokens=False)) < tokens - 12:
        text += FILLER
    return text


def measure_page(url: str, baseline: Callable[[], Growth], tokenizer, sizes: Sizes, log=None) -> dict:
    """Every figure of the suite, against an app at `url` and a baseline reply function."""
    from playwright.sync_api import sync_playwright

    say = log or (lambda _m: None)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    out: dict = {"sequence": []}  # (key, Growth) of every run in the order they ran
    timeout_s = float(os.environ.get("LOCALCHAT_PAGE_TIMEOUT_S", "600"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url)
            page.locator("#lc-input textarea").wait_for()
            session = PageSession(page)
            session.setting("lc-temperature", 0)
            session.setting("lc-max-tokens", sizes.page_tokens)
            # The page's first reply after the app starts also pays one-time costs (the browser compiling the
            # stream's code paths, the engine process's first allocations): the first round's page reply was
            # 0.76x-0.92x of its `generate` in five runs (benchmarks/NOTES.md session 7). It has its own row
            # and stays out of the rounds, which compare the page's steady streaming with `generate`.
            first = page_growth(session, PROMPT, timeout_s)
            first.tokens = count(first.text)
            out["page_first"] = first
            say(f"[page] first reply after the app started: {first.tokens} tokens, {first.tok_s:.1f} tok/s")
            for key in run_order(sizes.page_repeats):  # interleaved, so a slower minute of the machine hits all three
                session.memory_panel(open=key == "page_open")
                g = baseline() if key == "generate" else page_growth(session, PROMPT, timeout_s)
                g.tokens = count(g.text)
                out["sequence"].append((key, g))
                say(f"[page] {key}: {g.tokens} tokens, {g.tok_s:.1f} tok/s")
            session.memory_panel(open=False)
            out.update(_latencies(session, tokenizer, sizes, timeout_s, say))
        finally:
            browser.close()
    return out


def run_order(rounds: int) -> list[str]:
    """Every run of the suite in order: a `generate` before each page reply and one more at the end, so that
    each page reply is measured between two runs of `generate` (paired_ratios)."""
    return [key for r in range(rounds) for page in round_order(r) for key in ("generate", page)] + ["generate"]


def paired_ratios(sequence: list[tuple[str, Growth]], key: str) -> list[float]:
    """Each `key` reply's tok/s over the mean of the `generate` runs right before and right after it.

    This shared machine's speed drifts by more than the page costs: `generate` alone ran 95-154 tok/s within
    minutes, in spells of tens of seconds (benchmarks/NOTES.md session 17). Held against the runs beside it, a
    reply sees the same spell as its baseline; how far these ratios scatter tells how far a run's medians can
    be trusted."""
    rates = [(k, g.tok_s) for k, g in sequence]
    out = []
    for i, (k, rate) in enumerate(rates):
        if k != key:
            continue
        before = next((r for kk, r in reversed(rates[:i]) if kk == "generate"), None)
        after = next((r for kk, r in rates[i + 1:] if kk == "generate"), None)
        near = [r for r in (before, after) if r]
        if near:
            out.append(rate / statistics.fmean(near))
    return out


def round_order(r: int) -> tuple[str, str]:
    """Round r's two page replies, their order swapped every other round. With a fixed order the closed panel's
    reply, always right after `generate`'s process, was the slower one in four rounds of five although an open
    panel costs more CPU (benchmarks/NOTES.md, session 12)."""
    return ("page_closed", "page_open") if r % 2 == 0 else ("page_open", "page_closed")


REGENERATES = 3  # one regenerate's first token in the page varied by 80-130 ms from run to run


def _latencies(session: PageSession, tokenizer, sizes: Sizes, timeout_s: float, say) -> dict:
    page = session.page
    session.new_chat()
    session.setting("lc-max-tokens", max(8, sizes.page_tokens // 4))
    session.send(history_text(tokenizer, sizes.page_history_tokens), timeout_s)
    regens = [_timed(session, session.regenerate_last(timeout_s))]
    # Six clicks back and forth between the first two replies end on the newest again.
    clicks = [ms for ms in (session.branch_click_ms() for _ in range(6)) if ms is not None]
    regens += [_timed(session, session.regenerate_last(timeout_s)) for _ in range(REGENERATES - 1)]
    # Once: the replies are greedy, so every sibling is the same text, and after the first follow-up the next
    # would find that text's last block in the prefix cache too (a sampled sibling would not).
    page.locator("#lc-chat .lc-msg.lc-assistant:not([hidden]) .lc-prev:not([disabled])").first.click()
    follow_ms, follow_engine = _timed(session, session.send("Thanks. And in one word?", timeout_s))
    times = [ms for ms, _ in regens if ms is not None]
    figures = {
        "history_tokens": sizes.page_history_tokens,
        "regenerate_first_token_ms": statistics.median(times) if times else None,
        "regenerate_first_token_runs_ms": [ms for ms, _ in regens],
        "branch_click_ms": statistics.median(clicks) if clicks else None,
        "branch_click_runs_ms": clicks,
        "switch_then_send_first_token_ms": follow_ms,
        # what the engine itself measured for the same replies (shown under them in the page)
        "regenerate_engine": [engine for _, engine in regens],
        "switch_then_send_engine": follow_engine,
    }
    say(f"[page] latencies: {figures}")
    return figures


def _timed(session: PageSession, stamps: dict) -> tuple[float | None, dict]:
    """A reply's first token in the page (ms after the click or Enter), and the engine's own figures for it."""
    return _first_token_ms(stamps), session.newest_reply_stats()


# ---- the suite ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not serve {url} within {timeout_s:.0f} s")


def missing_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (Debian's chromium package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never `playwright install`)"
    return None


def suite_page(ctx: BenchContext, sizes: Sizes, report: Report, state: dict) -> None:
    why = missing_browser()
    if why is not None:
        report.skipped["page"] = why
        return
    tmp = Path(tempfile.mkdtemp(prefix="localchat-page-bench-"))
    try:
        spec = getattr(ctx.loaded, "spec", None)
        figures = _run_processes(ctx, sizes, tmp, spec.name) if spec is not None else _run_in_process(ctx, sizes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(figures, report)


def _run_processes(ctx: BenchContext, sizes: Sizes, tmp: Path, model: str) -> dict:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "config"), "TOKENIZERS_PARALLELISM": "false"}
    port = _free_port()
    log = open(tmp / "app.log", "wb")  # noqa: SIM115 - closed below
    app = subprocess.Popen([sys.executable, "-m", "localchat", "app", "--model", model, "--port", str(port),
                            "--db", str(tmp / "chats.db")], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, app, 900)
        cmd = [sys.executable, "-m", "localchat", "generate", PROMPT, "--model", model, "--temperature", "0",
               "--max-tokens", str(sizes.page_tokens)]
        return measure_page(url, lambda: generate_growth(cmd, env), ctx.tokenizer, sizes,
                            lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
        log.close()


def _run_in_process(ctx: BenchContext, sizes: Sizes, tmp: Path) -> dict:
    from localchat.chat.service import ChatService
    from localchat.chat.store import Store
    from localchat.engine import EngineDriver
    from localchat.ui.app import build_ui, launch
    from localchat.ui.presets import Presets

    driver = EngineDriver(ctx.engine(kv_cache_gb=sizes.kv_cache_gb))
    store = Store(tmp / "chats.db")
    demo = build_ui(ChatService(driver, store), presets=Presets(tmp / "presets.json"))
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    baseline_engine = ctx.engine(kv_cache_gb=sizes.kv_cache_gb)
    lock = threading.Lock()
    try:
        def baseline() -> Growth:
            with lock:
                return engine_growth(baseline_engine, PROMPT, sizes.page_tokens)

        return measure_page(f"http://127.0.0.1:{port}/", baseline, ctx.tokenizer, sizes)
    finally:
        demo.close()
        driver.shutdown()
        store.close()


def _report(f: dict, report: Report) -> None:
    f = {**f, **{k: [g for kk, g in f["sequence"] if kk == k] for k in ("generate", "page_closed", "page_open")}}
    gen = statistics.median(g.tok_s for g in f["generate"])
    paired = {key: paired_ratios(f["sequence"], key) for key in ("page_closed", "page_open")}
    for key, label in (("page_closed", "memory panel closed"), ("page_open", "memory panel open")):
        ours = statistics.median(g.tok_s for g in f[key])
        report.add("page", f"one reply in the page, {label}", ours, gen, "localchat generate (same prompt)", "tok/s")
    if f.get("page_first") is not None:
        report.add("page", "the first reply after the app starts, panel closed", f["page_first"].tok_s, None, unit="tok/s")
    if f.get("branch_click_ms") is not None:
        report.add("page", "click on a branch until shown", f["branch_click_ms"], None, unit="ms", higher_is_better=False)
    if f.get("regenerate_first_token_ms") is not None:
        report.add("page", f"regenerate until the first token ({f['history_tokens']}-token history, median of {REGENERATES})",
                   f["regenerate_first_token_ms"], None, unit="ms", higher_is_better=False)
    if f.get("switch_then_send_first_token_ms") is not None:
        report.add("page", "branch switch, then a new message until its first token",
                   f["switch_then_send_first_token_ms"], None, unit="ms", higher_is_better=False)
    report.details["page"] = {
        **{k: [{"tokens": g.tokens, "tok_s": g.tok_s, "seconds": g.last - g.first} for g in f[k]]
           for k in ("generate", "page_closed", "page_open")},
        "same_text": all(g.text == f["generate"][0].text for k in ("page_closed", "page_open") for g in f[k]),
        # each reply against the two `generate` runs beside it, and the median of those (the rows' ratios are
        # the ratio of the two medians)
        "paired_ratios": paired,
        "paired_median": {k: statistics.median(v) if v else None for k, v in paired.items()},
        "order": [k for k, _ in f["sequence"]],
        "page_first": {"tokens": f["page_first"].tokens, "tok_s": f["page_first"].tok_s} if f.get("page_first") else None,
        **{k: v for k, v in f.items() if k not in ("generate", "page_closed", "page_open", "page_first", "sequence")},
    }
