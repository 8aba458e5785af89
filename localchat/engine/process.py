"""The engine in a process of its own, so the page never slows it down.

The engine loop and a web server in one process share one GIL: measured here, a reply streamed to
the page at 0.42x the engine's own speed (shared/design.md). As vLLM v1 does with its engine core,
the app runs the engine in a child process: requests go in over a pipe, each step's outputs come
back over it, and the parent (web server, API, store) never holds the engine's interpreter.

The child builds its engine with a picklable factory (a module-level function and its arguments),
so the parent never loads the model's weights; it gets the tokenizer and the limits in EngineInfo.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from itertools import count

from localchat import settings
from localchat.engine.driver import EngineClient, EngineLoop, EngineStopped
from localchat.engine.outputs import OutputBatcher

log = logging.getLogger(__name__)

# How long the child may take to load its model and answer "ready" before the parent gives up.
START_TIMEOUT_S = 600.0


def _child_main(conn, factory: Callable, args: tuple, kwargs: dict) -> None:
    """The engine process: build the engine, say ready, then loop until told to stop."""
    # Ctrl-C reaches the whole process group: the parent decides how to stop (localchat/cli/shutdown.py),
    # and tells this process; if the parent dies instead, the pipe's end stops this loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = factory(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("start_failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", engine.info()))
    try:
        engine.warm_up()  # while the page loads: the person's first message then runs at full speed
    except Exception:  # noqa: BLE001 - a warm-up that fails costs the first reply its one-time costs, no more
        log.exception("the engine's warm-up failed")
    batcher = OutputBatcher(lambda outs: conn.send(("outputs", outs)), settings.ENGINE_OUTPUT_INTERVAL_S)

    def fail(request_id, exc) -> None:
        batcher.flush()  # what the request wrote before it failed goes first
        conn.send(("failed", (request_id, exc)))

    loop = EngineLoop(engine, batcher.add, fail)
    try:
        while True:
            # Commands first; wait for one only when there is nothing to compute.
            while conn.poll(0 if loop.has_work() else 0.5):
                kind, payload, call_id = conn.recv()
                if kind == "stop":
                    loop.stop_all("the engine was shut down")
                    batcher.flush()
                    return
                _handle(conn, loop, kind, payload, call_id)
                batcher.flush_if_due(idle=not loop.has_work())
            if loop.has_work():
                loop.step()
            batcher.flush_if_due(idle=not loop.has_work())
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent went away: nothing left to serve


def _handle(conn, loop: EngineLoop, kind: str, payload, call_id) -> None:
    if call_id is None:
        loop.handle(kind, payload)
        return
    try:
        conn.send(("result", (call_id, True, loop.handle(kind, payload))))
    except Exception as exc:  # noqa: BLE001 - a call's error goes back to its caller
        conn.send(("result", (call_id, False, exc)))


class EngineProcess(EngineClient):
    """An engine running in a child process; the same client API as the in-process EngineDriver."""

    def __init__(self, factory: Callable, *args, **kwargs) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that has started torch's threads
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, args=(child_conn, factory, args, kwargs),
                                    name="localchat-engine", daemon=True)
        self._process.start()
        child_conn.close()
        super().__init__(self._wait_ready())
        self._send_lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._call_ids = count()
        self._reader = threading.Thread(target=self._read, name="localchat-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._conn.poll(0.2):
                kind, payload = self._conn.recv()
                if kind == "ready":
                    return payload
                self._process.join(5)
                raise ValueError(f"the engine could not start: {payload}")
            if not self._process.is_alive():
                raise EngineStopped(f"the engine process exited while starting (exit code {self._process.exitcode})")
        self._process.kill()
        raise EngineStopped(f"the engine did not start within {START_TIMEOUT_S:.0f} s")

    # ------------------------------------------------------------------ commands out
    def _send(self, kind: str, payload, call_id: int | None = None) -> None:
        try:
            with self._send_lock:
                self._conn.send((kind, payload, call_id))
        except (OSError, ValueError) as exc:
            raise EngineStopped(f"the engine process is gone ({exc})") from None

    def call(self, fn, *args):
        if self._stopped:
            raise EngineStopped(self._stopped)
        future: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        self._send("call", (fn, args), call_id)
        return future.result()

    def shutdown(self) -> None:
        if self._stopped and not self._process.is_alive():
            return
        self._stopped = self._stopped or "the engine has been shut down"
        try:
            self._send("stop", None)
        except EngineStopped:
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._conn.close()

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    # ------------------------------------------------------------------ results in
    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            if kind == "outputs":
                self._deliver(payload)
            elif kind == "failed":
                self._fail(*payload)
            elif kind == "result":
                call_id, ok, value = payload
                future = self._calls.pop(call_id, None)
                if future is not None:
                    future.set_result(value) if ok else future.set_exception(value)
        reason = self._stopped = self._stopped or "the engine process stopped unexpectedly"
        self._fail_all(EngineStopped(reason))
        for future in list(self._calls.values()):
            future.set_exception(EngineStopped(reason))
        self._calls.clear()
