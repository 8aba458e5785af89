"""Following a reply from the page (localchat/ui/live.py): its own event stream, at most one update every
UI_STREAM_INTERVAL_S, the newest state each time, ending when the reply does; the engine side never waits."""

from __future__ import annotations

import json
import threading
import time

from starlette.applications import Starlette
from starlette.testclient import TestClient

from localchat import settings
from localchat.ui.compare import LiveView
from localchat.ui.live import LiveSlots


class Event:
    def __init__(self, index: int, text: str, tokens: int) -> None:
        self.index, self.text, self.generated_tokens = index, text, tokens


def stamped_states(client, key: str, then=None) -> list[tuple[float, dict]]:
    """Every state the stream sends, with when it came; `then` starts (in a thread) once the page is connected."""
    states = []
    with client.stream("GET", f"/lc/live/{key}") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        if then is not None:
            threading.Thread(target=then).start()
        for line in response.iter_lines():
            if line.startswith("data: "):
                states.append((time.monotonic(), json.loads(line[len("data: "):])))
    return states


def read_states(client, key: str, then=None) -> list[dict]:
    return [state for _, state in stamped_states(client, key, then)]


def test_a_reply_streams_its_newest_state_until_it_is_done():
    slots = LiveSlots()
    client = TestClient(Starlette(routes=[slots.route()]))
    slot = slots.open(LiveView(None, 1, False))

    def write():  # the thread reading the engine: publishes far faster than the page is sent updates
        text = ""
        for i in range(60):
            text += f"word{i} " + ("\n\n" if i % 7 == 6 else "")
            slot.publish([Event(0, text, i + 1)])
            time.sleep(0.01)
        slots.close(slot)

    started = time.monotonic()
    states = read_states(client, slot.key, then=write)
    elapsed = time.monotonic() - started
    assert states[-1]["done"] and states[-1]["samples"][0]["tokens"] == 60
    last = states[-1]["samples"][0]
    assert "word59" in last["head"] + last["tail"] and "word0" in last["head"]
    # finished paragraphs travel apart from the one being written
    assert any(s["samples"] and s["samples"][0]["head"] and s["samples"][0]["tail"] for s in states)
    versions = [s["version"] for s in states]
    assert versions == sorted(versions)
    assert len(states) <= elapsed / settings.UI_STREAM_INTERVAL_S + 2  # however fast the reply grows
    # ended: a page that connects late still gets the last state, until the page has shown the reply
    late = read_states(client, slot.key)
    assert len(late) == 1 and late[0]["done"] and late[0]["samples"] == states[-1]["samples"]
    slots.forget(slot)
    assert client.get(f"/lc/live/{slot.key}").status_code == 404
    assert client.get("/lc/live/not-a-key").status_code == 404


def test_samples_are_sent_together_and_escaped():
    slots = LiveSlots()
    client = TestClient(Starlette(routes=[slots.route()]))
    slot = slots.open(LiveView("hi", 3, False))
    slot.publish([Event(i, f"<script>alert({i})</script> sample {i}", 4) for i in range(3)])
    state = read_states(client, slot.key, then=lambda: slots.close(slot))[-1]
    assert [s["index"] for s in state["samples"]] == [0, 1, 2]
    assert all("<script" not in s["head"] + s["tail"] and "&lt;script&gt;" in s["tail"] for s in state["samples"])


def test_the_first_tokens_go_out_at_once_after_the_empty_frame(monkeypatch):
    """The page connects before the engine answers (an empty state); the first tokens then go out as
    they come, not one update interval after the empty state (stretched to 3 s here to tell them apart)."""
    monkeypatch.setattr(settings, "UI_STREAM_INTERVAL_S", 3.0)
    slots = LiveSlots()
    client = TestClient(Starlette(routes=[slots.route()]))
    slot = slots.open(LiveView(None, 1, False))
    stamps: dict[str, float] = {}

    def answer():
        time.sleep(0.02)
        stamps["published"] = time.monotonic()
        slot.publish([Event(0, "first", 1)])
        time.sleep(0.1)
        slots.close(slot)

    states = stamped_states(client, slot.key, then=answer)
    first_tokens = next(at for at, state in states if state["samples"])
    assert states[0][1]["samples"] == []  # the empty frame came first
    assert first_tokens - stamps["published"] < 1.5


def test_the_end_goes_out_at_once_not_an_interval_later(monkeypatch):
    """A reply that ends just after an update is shown whole when it ends (the page's last change is the
    reply's end, not the end plus an update interval, stretched to 3 s here to tell them apart)."""
    monkeypatch.setattr(settings, "UI_STREAM_INTERVAL_S", 3.0)
    slots = LiveSlots()
    client = TestClient(Starlette(routes=[slots.route()]))
    slot = slots.open(LiveView(None, 1, False))
    stamps: dict[str, float] = {}

    def answer():
        slot.publish([Event(0, "first", 1)])
        time.sleep(0.2)
        slot.publish([Event(0, "first and last", 3)])
        stamps["ended"] = time.monotonic()
        slots.close(slot)

    states = stamped_states(client, slot.key, then=answer)
    at, last = states[-1]
    assert last["done"] and last["samples"][0]["tokens"] == 3
    assert at - stamps["ended"] < 1.5


def panel_slots(monkeypatch, interval: float = 0.2):
    """LiveSlots whose panel data is a counter, with the `since` each call asked for."""
    monkeypatch.setattr(settings, "UI_PANEL_INTERVAL_S", interval)
    asked: list = []

    def panel(since):
        asked.append(since)
        return {"figures": {"n": len(asked)}, "timeline": {"now": 100.0 + len(asked), "samples": [], "events": []}}

    slots = LiveSlots(panel=panel)
    return slots, TestClient(Starlette(routes=[slots.route()])), asked


def write_for(slots, slot, seconds: float):
    def write():
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            i += 1
            slot.publish([Event(0, f"word{i} " * i, i)])
            time.sleep(0.01)
        slots.close(slot)
    return write


def test_a_page_that_shows_the_memory_panel_gets_its_data_on_the_reply_stream(monkeypatch):
    """An open panel's data rides on the reply's updates (one frame for the page, not two): at most every
    UI_PANEL_INTERVAL_S, each with the timeline since the one before, starting from the page's own time."""
    slots, client, asked = panel_slots(monkeypatch)
    slot = slots.open(LiveView(None, 1, False))
    states = []
    with client.stream("GET", f"/lc/live/{slot.key}?panel=1&since=42.5") as response:
        threading.Thread(target=write_for(slots, slot, 1.2)).start()
        for line in response.iter_lines():
            if line.startswith("data: "):
                states.append((time.monotonic(), json.loads(line[len("data: "):])))
    carried = [(at, s["memory"]) for at, s in states if "memory" in s]
    assert len(carried) >= 3 and carried[0][1]["figures"] == {"n": 1}
    assert asked == [42.5] + [100.0 + i for i in range(1, len(asked))]  # each since the previous answer
    gaps = [b[0] - a[0] for a, b in zip(carried, carried[1:])]
    assert min(gaps) >= 0.2 - 0.02, gaps
    assert all(s["samples"] for at, s in states if "memory" in s)  # never alone: it rides on a text update
    assert "memory" not in states[-1][1] and states[-1][1]["done"]  # the page polls again after the end


def test_the_stream_carries_no_panel_data_unless_the_page_asks(monkeypatch):
    slots, client, asked = panel_slots(monkeypatch)
    for query in ("", "?panel=0", "?since=3"):
        slot = slots.open(LiveView(None, 1, False))
        states = []
        with client.stream("GET", f"/lc/live/{slot.key}{query}") as response:
            threading.Thread(target=write_for(slots, slot, 0.5)).start()
            states = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        assert states[-1]["done"] and not any("memory" in s for s in states), query
    assert asked == []
    # a `since` that is not a time asks for the whole timeline (None), and never fails the stream
    for bad in ("x", "nan", "inf", ""):
        slot = slots.open(LiveView(None, 1, False))
        with client.stream("GET", f"/lc/live/{slot.key}?panel=1&since={bad}") as response:
            threading.Thread(target=write_for(slots, slot, 0.5)).start()
            states = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        assert states[-1]["done"] and asked[-1] is None, bad
