"""Runs an Engine on a background thread so many clients (UI sessions, CLI) share it.

The engine itself is single-threaded: only the loop thread touches it. Other threads submit and
abort through a command queue, and each request streams its outputs through its own queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

from localchat.engine.engine import Engine, Request
from localchat.engine.outputs import RequestOutput

log = logging.getLogger(__name__)


class RequestStream:
    """Iterate to receive a request's outputs as they come; the last one has finished=True."""

    def __init__(self, driver: "EngineDriver", request_id: str) -> None:
        self.request_id = request_id
        self._driver = driver
        self._queue: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        self.final: RequestOutput | None = None

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[RequestOutput]:
        while self.final is None:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.final = item
            yield item

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        assert self.final is not None
        return self.final

    def abort(self) -> None:
        self._driver.abort(self.request_id)


class EngineDriver:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="localchat-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- client API
    def submit(self, prompt: str | None = None, **kwargs) -> RequestStream:
        """Validate now (errors raise here, on the caller's thread) and queue the request."""
        if self._stop.is_set():
            raise RuntimeError("the engine has been shut down")
        request = self.engine.make_request(prompt, **kwargs)
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            stream = RequestStream(self, request.request_id)
            self._streams[request.request_id] = stream
        self._commands.put(("add", request))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def call(self, fn, *args):
        """Run `fn(engine, *args)` on the loop thread between steps and return its result."""
        done: queue.Queue = queue.Queue()
        self._commands.put(("call", (fn, args, done)))
        self._wake.set()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def snapshot(self):
        """The memory panel's view; the block manager's lock makes this safe from any thread."""
        return self.engine.block_manager.snapshot()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- the loop
    def _handle(self, command: tuple) -> None:
        kind, payload = command
        if kind == "add":
            request: Request = payload
            try:
                self.engine.add(request)
            except Exception as exc:  # noqa: BLE001 - reported to the submitter
                self._deliver_error(request.request_id, exc)
        elif kind == "abort":
            out = self.engine.abort(payload)
            if out is not None:
                self._deliver(out)
        elif kind == "call":
            fn, args, done = payload
            try:
                done.put((True, fn(self.engine, *args)))
            except Exception as exc:  # noqa: BLE001
                done.put((False, exc))

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
        if stream is not None:
            stream._put(out)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            while True:
                try:
                    self._handle(self._commands.get_nowait())
                except queue.Empty:
                    break
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                for out in self.engine.step():
                    self._deliver(out)
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("engine step failed")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver_error(request_id, exc)
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver_error(request_id, RuntimeError("the engine was shut down"))
