"""The browser UI's pure parts: safe markdown, the conversation tree, comparisons, the overview, the memory
panel's data, settings and presets; replies saved with their details; the app's command line.
(The page itself, in Chromium, is tests/test_ui_browser.py.)"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from localchat.chat.store import Store
from localchat.engine.block_manager import BlockManager
from localchat.engine.sampling_params import SamplingParams
from localchat.ui.compare import LiveView, compare_html
from localchat.ui.markdown import StreamingMarkdown, render_markdown, stable_split
from localchat.ui.memory_panel import panel_data, render_memory_html
from localchat.ui.overview import overview_html
from localchat.ui.presets import BUILTIN, PresetError, Presets
from localchat.ui.render import conversation_choices, params_from_settings, params_from_ui, safe_markdown, stop_strings
from localchat.ui.thread import Tree, conversation_html, reply_stats

# Gradio's queue uses pandas APIs that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.*")

ROOT = Path(__file__).resolve().parents[1]
XSS = "<img src=x onerror=alert(1)>"
EVIL = [XSS, "<script>alert(1)</script>", 'a <b onmouseover="x">bold</b>', "[click](javascript:alert(1))",
        "![i](http://example.com/x.png)", "<http://example.com>", '"><svg onload=alert(1)>', "&lt;img src=x&gt;"]


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def elements(html_text: str) -> list[tuple[str, dict]]:
    parser = _Elements()
    parser.feed(html_text)
    return parser.elements


def assert_inert(html_text: str) -> None:
    """No element or attribute that can run code or fetch anything."""
    for tag, attrs in elements(html_text):
        assert tag not in ("script", "img", "svg", "iframe", "a", "object", "embed", "style", "link"), tag
        assert not any(k.startswith("on") for k in attrs), attrs
        assert not any("javascript:" in (v or "") for v in attrs.values() if v and not v.startswith("{")), attrs


# ------------------------------------------------------------------ markdown
@pytest.mark.parametrize("text", EVIL)
def test_markdown_renders_nothing_active(text):
    out = render_markdown(f"say {text} now")
    assert_inert(out)
    assert "say" in out


def test_markdown_keeps_formatting_and_code_as_text():
    out = render_markdown("**bold** and `a < b`\n\n```html\n<div>x</div>\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    assert "<strong>bold</strong>" in out and "<code>a &lt; b</code>" in out
    assert "&lt;div&gt;x&lt;/div&gt;" in out and "<table>" in out
    assert_inert(out)


def test_streaming_markdown_equals_a_full_render_at_block_boundaries():
    text = "Intro paragraph.\n\n```python\nx = 1\n\ny = 2\n```\n\nA list:\n\n- one\n- two\n\nThe end **now**."
    md = StreamingMarkdown()
    for cut in range(1, len(text) + 1):
        partial = md.render(text[:cut])
        assert_inert(partial)
    assert md.render(text) == render_markdown(text)
    # a blank line inside a fence is not a boundary
    assert stable_split("```\na\n\nb") == 0
    assert stable_split("a\n\nb") == 3


def test_safe_markdown_leaves_no_tags():
    for text in EVIL[:3]:
        out = safe_markdown(text)
        assert "<" not in out and ">" not in out


# ------------------------------------------------------------------ the conversation
def three_level_tree(store: Store):
    """u1 -> a1 | a2 ; a2 -> u2 | u2' ; u2' -> a3 | a4 | a5. The current leaf is a5."""
    c = store.create_conversation(f"Tree {XSS}")
    u1 = store.append_message(c.id, None, "user", f"first {XSS}", token_ids=list(range(20)))
    a1 = store.append_message(c.id, u1.id, "assistant", "reply one", token_ids=[1, 2, 3], model="m",
                              generated_tokens=3, ttft_s=0.05, tokens_per_s=40.0, prompt_tokens=20, finish_reason="stop")
    a2 = store.append_message(c.id, u1.id, "assistant", "reply two", token_ids=[4, 5], finish_reason="stop")
    u2 = store.append_message(c.id, a2.id, "user", "second", token_ids=[6, 7])
    u2e = store.append_message(c.id, a2.id, "user", "second, edited", token_ids=[6, 8])
    a3 = store.append_message(c.id, u2e.id, "assistant", "**three**", token_ids=[9], finish_reason="length")
    a4 = store.append_message(c.id, u2e.id, "assistant", "four", token_ids=[10])
    a5 = store.append_message(c.id, u2e.id, "assistant", "five", token_ids=[11])
    return c, dict(u1=u1, a1=a1, a2=a2, u2=u2, u2e=u2e, a3=a3, a4=a4, a5=a5)


def test_conversation_html_has_every_branch_and_shows_one(tmp_path):
    with Store(tmp_path / "c.db") as store:
        c, m = three_level_tree(store)
        messages = store.list_messages(c.id)
        out = conversation_html(c.id, messages, m["a5"].id, context=512)
        assert_inert(out)
        arts = [(a["data-id"], "hidden" in a) for t, a in elements(out) if t == "article"]
        assert len(arts) == 8
        visible = [int(i) for i, hidden in arts if not hidden]
        assert visible == [m["u1"].id, m["a2"].id, m["u2e"].id, m["a5"].id]
        positions = re.findall(r'<span class="lc-pos">(\d+/\d+)</span>', out)
        assert sorted(positions) == sorted(["1/2", "2/2", "1/2", "2/2", "1/3", "2/3", "3/3"])
        # the raw text travels escaped in data-src (for edit and copy) and comes back intact
        src = next(a["data-src"] for t, a in elements(out) if t == "article" and a["data-id"] == str(m["u1"].id))
        assert src == f"first {XSS}"
        assert "40.0 tok/s" in out and "first token 0.05 s" in out and "stopped at the token limit" in out
        # depth order: every parent comes before its children
        order = [int(i) for i, _ in arts]
        tree = Tree.of(messages)
        assert all(order.index(tree.by_id[i].parent_id) < order.index(i) for i in order if tree.by_id[i].parent_id)
        assert tree.newest_leaf(m["a2"].id) == m["a5"].id and tree.newest_leaf(m["u2"].id) == m["u2"].id


def test_reply_stats_name_every_figure():
    class M:
        generated_tokens, ttft_s, tokens_per_s, prompt_tokens, prefix_hit_tokens = 87, 0.123, 45.67, 120, 96
        cumulative_logprob, model, finish_reason, sampling = -12.5, "SmolLM2", "stop", {}

    line = reply_stats(M())
    for part in ("87 tokens", "first token 0.12 s", "45.7 tok/s", "96 of 120 prompt tokens from the prefix cache", "SmolLM2"):
        assert part in line
    assert "beam score -3.125" in reply_stats(M(), length_penalty=1.0 / 1.0) or "beam score" in reply_stats(M(), length_penalty=1.0)


def test_compare_cards_and_live_view(tmp_path):
    with Store(tmp_path / "c.db") as store:
        c, m = three_level_tree(store)
        messages = store.list_messages(c.id)
        path = Tree.of(messages).path(m["a5"].id)
        out = compare_html(messages, m["a4"].id, path)
        assert_inert(out)
        cards = [a for t, a in elements(out) if t == "article"]
        assert [int(a["data-id"]) for a in cards] == [m["a3"].id, m["a4"].id, m["a5"].id]
        assert ["lc-current" in a["class"] for a in cards] == [False, False, True]
        assert out.count("Continue with this one") == 3 and "<strong>three</strong>" in out
        assert compare_html(messages, m["u1"].id, path) == ""  # no siblings, nothing to compare

    class E:
        def __init__(self, i, text):
            self.index, self.text, self.generated_tokens = i, text, len(text)

    live = LiveView(XSS, n=3, beam=False)
    page = live.html([E(0, "a"), E(1, XSS), E(2, "c")])
    assert_inert(page)
    assert page.count('class="lc-card lc-streaming"') == 3 and "sample 2 of 3" in page
    one = LiveView(None, 1, False).html([E(0, "hello")])
    assert "lc-streaming" in one and "hello" in one


def test_overview_nests_branches_and_marks_what_is_cached(tmp_path):
    with Store(tmp_path / "c.db") as store:
        c, m = three_level_tree(store)
        messages = store.list_messages(c.id)
        asked = []

        def cached(id_lists):
            asked.extend(id_lists)
            # a1's branch: one block of u1 cached; a3's: nothing; the other branches through a2: 24 tokens
            return [8 if ids[20:23] == [1, 2, 3] else 0 if ids[-1] == 9 else 24 for ids in id_lists]

        out = overview_html(c.id, messages, m["a5"].id, cached=cached, block_size=8)
        assert_inert(out)
        assert len(asked) == 5  # one question per leaf: a1, u2, a3, a4, a5
        nodes = {int(a["data-node"]): a for t, a in elements(out) if t == "button"}
        assert set(nodes) == {x.id for x in messages}
        on_path = {i for i, a in nodes.items() if "lc-on-path" in a["class"]}
        assert on_path == {m["u1"].id, m["a2"].id, m["u2e"].id, m["a5"].id}
        marks = {int(k): v for k, v in re.findall(r'data-node="(\d+)"[^>]*><i class="lc-cache lc-cache-(\w+)"', out)}
        assert marks[m["a1"].id] == "partial"  # 23 ids, 16 in whole blocks, 8 cached
        assert marks[m["u1"].id] == "full"  # through a2, its 16 whole-block ids are cached
        assert marks[m["u2e"].id] == marks[m["a5"].id] == marks[m["u2"].id] == "full"  # 25: the partial block is computed anyway
        assert marks[m["a3"].id] == "none"
        assert out.count('class="lc-ov-branch"') == 2 + 2 + 3  # replies to u1, edits after a2, replies to u2'
        assert XSS not in out and html.escape(f"first {XSS}"[:48]) in out
        assert "lc-cache-unknown" in overview_html(c.id, messages, None, cached=None)


# ------------------------------------------------------------------ memory panel
def forked_manager() -> BlockManager:
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate(1, list(range(10)))
    bm.append(1, list(range(10)))
    bm.mark_computed(1)
    bm.fork(1, 2)
    bm.append(2, [99])
    return bm


def test_memory_panel_data_from_a_block_manager():
    bm = forked_manager()
    data = panel_data(bm.compact_snapshot(), block_bytes=1024 * 1024)
    assert len(data["states"]) == 16 and data["states"].count("u") == bm.figures().blocks_used == 4
    f = data["figures"]
    assert f["cow_copies"] == 1 and f["blocks_unshared"] == 6 and f["sharing_savings"] == pytest.approx(1 - 4 / 6)
    assert data["mib"]["pool"] == 16 and data["mib"]["used"] == 4 and data["mib"]["unshared"] == 6
    assert [s["seq"] for s in data["seqs"]] == [1, 2]
    both = set(data["seqs"][0]["blocks"]) & set(data["seqs"][1]["blocks"])
    assert len(both) == 2  # the two full blocks are shared; the partial one was copied on write
    assert [e[1] for e in data["timeline"]["events"]] == ["fork", "cow"]
    json.dumps(data)
    # the per-block snapshot gives the same pool
    assert panel_data(bm.snapshot())["states"] == data["states"]
    bm.free(1)
    bm.free(2)
    after = panel_data(bm.compact_snapshot())
    assert after["seqs"] == [] and after["states"].count("c") == 2 and "u" not in after["states"]


def test_memory_panel_html_is_escaped_data():
    bm = forked_manager()

    class Seq:
        def __init__(self, seq_id, index):
            self.seq_id, self.request_id, self.index, self.num_tokens, self.status, self.beam = seq_id, "r1", index, 10, "running", False

    class Snap:
        memory = bm.compact_snapshot()
        sequences = (Seq(1, 0), Seq(2, 1))
        block_bytes = 4096

    out = render_memory_html(Snap(), title=XSS, labels={"r1": ("r1", f"«{XSS}» · message 2")})
    assert_inert(out)
    assert XSS not in out
    payload = next(a["data-panel"] for t, a in elements(out) if t == "div" and "data-panel" in a)
    data = json.loads(payload)
    assert data["title"] == XSS
    assert [s["label"] for s in data["seqs"]] == [f"«{XSS}» · message 2 · sample 1", f"«{XSS}» · message 2 · sample 2"]
    assert "No memory snapshot" in render_memory_html(None)


# ------------------------------------------------------------------ settings and presets
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
        ((0.7, 0.9, 10, None, 9), "at most 8"),
        ((float("nan"), 0.9, 10, None, 1), "temperature"),
    ],
)
def test_bad_sampling_values_are_clear_errors(values, message):
    with pytest.raises(ValueError, match=message):
        params_from_ui(*values)


def test_every_setting_reaches_the_sampling_params():
    p = params_from_settings([0.5, 0.9, 40, 0.05, 1.1, 32.0, "7", "END\n\\n\\n", 2, 0])
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.max_tokens, p.seed, p.n) == (0.5, 0.9, 40, 0.05, 1.1, 32, 7, 2)
    assert p.stop == ("END", "\n\n") and p.beam_width == 0
    beams = params_from_settings([0, 1, 0, 0, 1, 16, "", "", 1, 4])
    assert beams.is_beam_search and beams.beam_width == 4
    with pytest.raises(ValueError, match="either n"):
        params_from_settings([0, 1, 0, 0, 1, 16, "", "", 2, 4])
    with pytest.raises(ValueError, match="min_p"):
        params_from_settings([0, 1, 0, 2.0, 1, 16, "", "", 1, 0])
    assert stop_strings("") == () and params_from_ui(0, 1, 5, "", 1).seed is None


def test_presets_survive_a_restart_and_bad_files_are_reported(tmp_path):
    path = tmp_path / "cfg" / "presets.json"
    first = Presets(path)
    assert set(BUILTIN) <= set(first.names())
    first.save("Mine", {"temperature": 0.3, "top_k": 20, "stop": "END", "system_prompt": "Be terse."})
    again = Presets(path)  # a new process reads the same file
    mine = again.get("Mine")
    assert mine["temperature"] == 0.3 and mine["top_k"] == 20 and mine["system_prompt"] == "Be terse."
    assert mine["max_tokens"] == BUILTIN["Balanced"]["max_tokens"]  # unspecified fields take the defaults
    with pytest.raises(PresetError, match="built-in"):
        again.save("Balanced", {})
    with pytest.raises(PresetError, match="name"):
        again.save("  ", {})
    again.delete("Mine")
    assert "Mine" not in Presets(path).names()
    path.write_text("{not json")
    broken = Presets(path)
    assert broken.names() == list(BUILTIN) and "could not be read" in broken.problem
    with pytest.raises(PresetError, match="could not be read"):
        broken.save("Other", {})
    assert path.read_text() == "{not json"  # left as it was


def test_sidebar_labels_are_plain_text(tmp_path):
    with Store(tmp_path / "c.db") as store:
        conv = store.create_conversation(XSS)
        assert conversation_choices(store.list_conversations()) == [(XSS, str(conv.id))]


# ------------------------------------------------------------------ replies keep their details
@pytest.fixture
def service(chat_service):
    return chat_service(num_blocks=512)


def test_samples_are_siblings_in_one_group_with_their_details(service):
    conv = service.new_conversation()
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True, n=3)
    final = list(service.send(conv.id, "Name a color", params))[-1]
    assert [e.index for e in final] == [0, 1, 2] and all(e.finished and e.generated_tokens == 10 for e in final)
    ids = [e.message_id for e in final]
    sib = service.store.siblings(ids[0])
    assert sib.ids == tuple(ids) and service.store.current_path(conv.id)[-1].id == ids[0]
    saved = [service.store.get_message(i) for i in ids]
    assert len({m.sample_group for m in saved}) == 1 and saved[0].sample_group
    assert all(m.prompt_tokens > 0 and m.prefix_hit_tokens is not None and m.cumulative_logprob < 0 for m in saved)
    assert all(m.model == service.info.model_name for m in saved)
    again = list(service.regenerate(ids[1], params.with_(n=2)))[-1]
    assert service.store.siblings(again[0].message_id).count == 5
    regenerated = service.store.get_message(again[0].message_id)
    assert regenerated.prefix_hit_tokens > 0 and regenerated.sample_group != saved[0].sample_group
    single = list(service.regenerate(ids[0], params.with_(n=1)))[-1][0]
    assert service.store.get_message(single.message_id).sample_group is None
    assert service.live == {}  # nothing is left registered once the replies end
    assert service.driver.call(lambda e: e.block_manager.figures().blocks_used) == 0


def test_beam_search_replies_are_saved_with_their_scores(service):
    conv = service.new_conversation()
    final = list(service.send(conv.id, "Hello", SamplingParams(beam_width=3, max_tokens=6, ignore_eos=True, temperature=0)))[-1]
    assert len(final) == 3
    saved = [service.store.get_message(e.message_id) for e in final]
    assert all(m.finish_reason in ("length", "stop") for m in saved)
    scores = [m.cumulative_logprob / len(m.token_ids) for m in saved]
    assert scores == sorted(scores, reverse=True)  # best first, as the engine ranks them
    assert len({m.sample_group for m in saved}) == 1


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


def test_every_event_of_the_page_keeps_its_progress_on_the_status_line(service):
    """Gradio's page snapshots every component an event's loading status has reached, each time any event's
    status changes (localchat/ui/app.py quiet_events): each event of the page sends its (hidden) progress to
    the status line only, so the snapshots stay few however many outputs the events have."""
    from localchat.ui.app import build_ui

    demo = build_ui(service)
    status_id = next(c["id"] for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "lc-status")
    page_events = [d for d in demo.config["dependencies"] if d["targets"] and d["targets"][0][1] != "unload"]
    assert len(page_events) >= 20
    loud = [(d["id"], d["targets"], d["outputs"]) for d in page_events if d.get("show_progress_on") != [status_id]]
    assert loud == []
    assert all(d["show_progress"] == "hidden" for d in page_events)
