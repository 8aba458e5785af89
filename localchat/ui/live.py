"""A reply being written, followed by the page at its own pace.

Measured on this project's two-core machines, every update that goes through Gradio's component path
costs the browser ~14 ms of CPU and the server ~8 ms (its state copies, re-rendering, diffing), and
asking the server with a request of its own costs the browser ~4 ms more; on two cores that time is
taken from the engine. So while a reply streams, Gradio carries no updates: the handler only stores
the newest events in a `LiveSlot` (a reference swap per engine output), and the page listens on one
event stream of its own (`route`, /lc/live/KEY) that sends the newest state at most three times a second
(settings.UI_STREAM_INTERVAL_S), and at once when the first token is there and when the reply ends; its
last state says the reply is done. The engine never waits for the page.

An open memory panel polls the server once a second, and each poll's answer was one more frame for the
browser to draw, on the engine's cores: ~0.03 of a core while a reply streamed (benchmarks/NOTES.md session 15).
So a page that shows the panel when the reply starts asks for it on the reply's stream (`?panel=1&since=T`):
every UI_PANEL_INTERVAL_S one of the reply's updates carries the panel's data too (`"memory"`), drawn in the
same frame as the text, and the panel's own polls wait until the stream stops carrying it.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from localchat import settings
from localchat.ui.compare import LiveView

WAIT_S = 1.0  # with nothing new for this long, the stream sends a keep-alive line


class LiveSlot:
    def __init__(self, view: LiveView) -> None:
        self.key = uuid.uuid4().hex  # unguessable: only the page that started the reply can follow it
        self.view = view
        self.events: list = []
        self.version = 0
        self.done = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]] = set()
        self._lock = threading.Lock()

    def publish(self, events: list | None = None, *, done: bool = False) -> None:
        """The newest events (from the thread that reads the reply); wakes the page's stream."""
        if events is not None:
            self.events = events
        self.done = self.done or done
        self.version += 1
        with self._lock:
            woken = {w for w in self._waiters if self.done or not w[2]}
            self._waiters -= woken
        for loop, event, _ in woken:
            loop.call_soon_threadsafe(event.set)

    async def wait_newer(self, version: int, timeout: float = WAIT_S, *, done_only: bool = False) -> None:
        """Returns when there is a state newer than `version` (with done_only: when the reply has ended), or
        after `timeout` seconds."""
        def ready() -> bool:
            return self.done or (self.version != version and not done_only)

        if ready():
            return
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        waiter = (loop, event, done_only)
        with self._lock:
            self._waiters.add(waiter)
        if ready():  # published meanwhile
            with self._lock:
                self._waiters.discard(waiter)
            return
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    def state(self) -> dict:
        return {"version": self.version, "done": self.done, "samples": self.view.samples(self.events)}


PanelData = Callable[[float | None], dict]  # the memory panel's data, with its timeline since a time


class LiveSlots:
    """The replies being written now, by key (several tabs, several replies at once). `panel` gives the
    memory panel's data to the streams of pages that show the panel (the same as its poll answers)."""

    def __init__(self, panel: PanelData | None = None) -> None:
        self._slots: dict[str, LiveSlot] = {}
        self._panel = panel

    def open(self, view: LiveView) -> LiveSlot:
        slot = LiveSlot(view)
        self._slots[slot.key] = slot
        return slot

    def close(self, slot: LiveSlot) -> None:
        """The reply ended: its stream sends the last state, and a page that connects late still gets it."""
        slot.publish(done=True)

    def forget(self, slot: LiveSlot) -> None:
        """The page has shown the ended reply (or its tab is gone): the key leads nowhere from now on."""
        slot.publish(done=True)
        self._slots.pop(slot.key, None)

    def route(self) -> Route:
        """GET /lc/live/KEY: the reply's state as server-sent events, until it is done."""

        async def live(request: Request):
            slot = self._slots.get(request.path_params["key"])
            if slot is None:
                return Response("no such reply (it has ended)", status_code=404, media_type="text/plain")
            panel = _PanelFeed(self._panel, request.query_params) if self._panel else None
            return StreamingResponse(self._events(slot, panel), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        return Route("/lc/live/{key}", live, methods=["GET"])

    async def _events(self, slot: LiveSlot, panel: _PanelFeed | None = None):
        version = -1
        while True:
            await slot.wait_newer(version)
            if slot.version == version and not slot.done:
                yield ": waiting\n\n"  # a comment line: a closed tab fails this write and ends the stream
                continue
            version = slot.version
            state = slot.state()
            if panel is not None and not slot.done and slot.events and panel.due():
                state["memory"] = await run_in_threadpool(panel.take)  # the engine answers between its steps
            yield f"data: {json.dumps(state, separators=(',', ':'))}\n\n"
            if slot.done:
                return
            if slot.events:  # at most UI_STREAM_INTERVAL_S apart, but the first tokens and the end go out at once
                await slot.wait_newer(version, settings.UI_STREAM_INTERVAL_S, done_only=True)


class _PanelFeed:
    """The memory panel's data for one page's stream: at most every UI_PANEL_INTERVAL_S, each with the
    timeline since the previous one (the page asks with the time of the timeline it has: `since`)."""

    def __init__(self, panel: PanelData, query) -> None:
        self.panel = panel
        self.wanted = query.get("panel") == "1"
        try:
            since = float(query.get("since", ""))
        except ValueError:
            since = math.nan
        self.since = since if math.isfinite(since) else None  # none, or not a time: the whole timeline
        self.next_at = 0.0

    def due(self) -> bool:
        return self.wanted and time.monotonic() >= self.next_at

    def take(self) -> dict:
        self.next_at = time.monotonic() + settings.UI_PANEL_INTERVAL_S
        data = self.panel(self.since)
        now = (data.get("timeline") or {}).get("now")
        if isinstance(now, (int, float)):
            self.since = now
        return data
