"""Clients of the engine: many threads (UI sessions, API requests) share one engine through a driver.

The engine itself is single-threaded: only its loop touches it. `EngineLoop` is that loop's body
(commands in, one step at a time, outputs out, faults contained); it runs on a background thread
here (`EngineDriver`) or in a process of its own (localchat/engine/process.py). Clients submit and
abort through the driver, and each request streams its outputs through its own `RequestStream`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from localchat.engine.outputs import RequestOutput
from localchat.engine.requests import EngineInfo, Request, RequestFactory

if TYPE_CHECKING:  # the engine (torch, the model) is imported only where one runs
    from localchat.engine.engine import Engine

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine was shut down (or its process ended) while a request was running."""


class RequestFailed(RuntimeError):
    """The engine failed this request (a fault in its step, non-finite logits); the engine goes on
    serving the others, and the request's blocks are free."""


class RequestStream:
    """Iterate to receive a request's outputs as they come; the last one has finished=True.

    `async for` works too (the API server): it waits on the event loop instead of holding a thread.
    The client stamps when outputs arrive (perf_counter): `submitted_at`, `first_token_at`,
    `last_token_at`, what a caller of this client sees, IPC included.
    """

    def __init__(self, client: "EngineClient", request_id: str) -> None:
        self.request_id = request_id
        self._client = client
        self.model_name = client.info.model_name  # the model that writes this reply (engines can be swapped)
        self._queue: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        self.final: RequestOutput | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._wake: Callable[[], None] | None = None

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)
        wake = self._wake
        if wake is not None:
            wake()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while self.final is None:
                ready.clear()  # before draining: a put after the drain sets it again
                while self.final is None:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    if item.finished:
                        self.final = item
                    yield item
                if self.final is None:
                    await ready.wait()
        finally:
            self._wake = None

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
        self._client.abort(self.request_id)


class EngineLoop:
    """The engine's loop body: apply client commands between steps, step, hand outputs on.

    `deliver` gets each step's outputs; `fail` gets (request_id, exception) for requests that end in
    an error. The engine contains faults in a step's forward pass and sampling to that step's requests
    (their outputs carry `error`); a step that still raises (a fault in scheduling, where the tables
    may be half changed) aborts every request, and the loop goes on.
    """

    def __init__(self, engine: Engine, deliver: Callable[[list[RequestOutput]], None],
                 fail: Callable[[str, BaseException], None]) -> None:
        self.engine = engine
        self.deliver = deliver
        self.fail = fail

    def handle(self, kind: str, payload) -> object:
        """Apply one command: ("add", Request), ("abort", request_id) or ("call", (fn, args))."""
        if kind == "add":
            request: Request = payload
            try:
                self.engine.add(request)
            except Exception as exc:  # noqa: BLE001 - reported to the submitter
                self.fail(request.request_id, exc)
        elif kind == "abort":
            out = self.engine.abort(payload)
            if out is not None:
                self.deliver([out])
        elif kind == "call":
            fn, args = payload
            return fn(self.engine, *args)
        return None

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
            log.exception("engine step failed")
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
                self.fail(request_id, exc)
            return
        if outputs:
            self.deliver(outputs)

    def stop_all(self, reason: str) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self.fail(request_id, EngineStopped(reason))


class EngineClient(ABC):
    """What every client of an engine uses: submit, abort, call, snapshot, info, shutdown.

    Subclasses carry commands to the loop (a thread, or a process) and hand outputs back through
    `_deliver`/`_fail`; requests are validated here, on the caller's thread.
    """

    info: EngineInfo

    def __init__(self, info: EngineInfo) -> None:
        self.info = info
        self._factory = RequestFactory(info, prefix=f"req{id(self) % 10_000}")
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._stopped: str | None = None  # why the engine no longer takes requests
        # Called as listener(stream, output) for every output delivered, after the stream's time
        # stamps are updated: one place that sees every request of every caller (metrics).
        self.listeners: list[Callable[[RequestStream, RequestOutput], None]] = []

    def submit(self, prompt: str | None = None, **kwargs) -> RequestStream:
        """Validate now (errors raise here, on the caller's thread) and queue the request."""
        if self._stopped:
            raise EngineStopped(self._stopped)
        request = self._factory.make(prompt, **kwargs)
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            stream = RequestStream(self, request.request_id)
            self._streams[request.request_id] = stream
        try:
            self._send("add", request)
        except EngineStopped:
            self._fail(request.request_id, EngineStopped(self._stopped or "the engine is gone"))
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    @property
    def stopped(self) -> str | None:
        """Why the engine no longer takes requests, or None while it does."""
        return self._stopped

    def pending(self) -> int:
        """Requests submitted through this client that have not finished yet."""
        with self._lock:
            return len(self._streams)

    @abstractmethod
    def call(self, fn, *args):
        """Run `fn(engine, *args)` in the engine's loop between steps and return its result."""

    def snapshot(self):
        """The memory panel's view of the block pool (localchat.engine.block_manager.MemorySnapshot)."""
        return self.call(memory_snapshot)

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the loop; running requests end with EngineStopped."""

    @abstractmethod
    def _send(self, kind: str, payload) -> None:
        """Carry a command to the loop."""

    # ------------------------------------------------------------ outputs in
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
            if stream is None:
                continue
            if out.error is not None:
                self._notify(stream, out)
                stream._put(RequestFailed(out.error))
                continue
            if any(o.delta_token_ids or o.delta_text for o in out.outputs):
                if stream.first_token_at is None:
                    stream.first_token_at = now
                stream.last_token_at = now
            self._notify(stream, out)
            stream._put(out)

    def _notify(self, stream: RequestStream, out: RequestOutput) -> None:
        for listener in self.listeners:
            try:
                listener(stream, out)
            except Exception:  # noqa: BLE001 - a metrics bug must not lose a reply
                log.exception("stream listener failed")

    def _fail(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream._put(exc)


def memory_snapshot(engine: Engine):
    return engine.block_manager.snapshot()


class EngineDriver(EngineClient):
    """The engine on a background thread of this process (tests, the CLI, the terminal chat)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.info())
        self.engine = engine
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loop = EngineLoop(engine, self._deliver, self._fail)
        self._thread = threading.Thread(target=self._run, name="localchat-engine", daemon=True)
        self._thread.start()

    def _send(self, kind: str, payload) -> None:
        self._commands.put((kind, payload, None))
        self._wake.set()

    def call(self, fn, *args):
        done: queue.Queue = queue.Queue()
        self._commands.put(("call", (fn, args), done))
        self._wake.set()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def snapshot(self):
        # The block manager's lock makes this safe from any thread, without waiting for a step.
        return memory_snapshot(self.engine)

    def shutdown(self) -> None:
        self._stopped = "the engine has been shut down"
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        loop = self._loop
        while not self._stop.is_set():
            while True:
                try:
                    kind, payload, done = self._commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    result = loop.handle(kind, payload)
                    if done is not None:
                        done.put((True, result))
                except Exception as exc:  # noqa: BLE001 - a call's error goes back to its caller
                    if done is None:
                        raise
                    done.put((False, exc))
            if not loop.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            loop.step()
        loop.stop_all("the engine was shut down")
