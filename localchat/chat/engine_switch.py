"""Changing the model under a running app: an engine client that can be replaced, and the switch itself.

`SwitchableEngine` is what ChatService (and the page, and the API) hold: it forwards every call to the
current engine client. `ModelSwitcher.begin(name)` swaps models in the background: download the files
if the model is a Hub model that is not here (progress in `SwitchStatus`), start a new engine (in the
app, a new engine process) on it, point new requests at it, let the replies still streaming from the
old engine finish, then shut the old engine down so its memory goes back to the system. Conversations
are untouched; every reply records the model whose stream wrote it (RequestStream.model_name).

When both models will not fit at once (localchat/model/memory.py says), the old engine is stopped
first and, if the new one then fails to start, started again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from localchat.engine import EngineClient, EngineStopped

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0  # how long replies still streaming from the old engine may take to finish


class SwitchableEngine:
    """An engine client whose engine can be replaced; the same API as EngineClient."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._paused: str | None = None  # set while no engine serves (a swap that had to stop the old one)

    # ---- EngineClient's API, forwarded -------------------------------------------------------
    @property
    def current(self) -> EngineClient:
        return self._client

    @property
    def info(self):
        return self._client.info

    @property
    def listeners(self) -> list:
        return self._client.listeners

    @property
    def stopped(self) -> str | None:
        return self._paused or self._client.stopped

    def submit(self, prompt: str | None = None, **kwargs):
        with self._lock:
            if self._paused:
                raise EngineStopped(self._paused)
            return self._client.submit(prompt, **kwargs)

    def abort(self, request_id: str) -> None:
        self._client.abort(request_id)

    def call(self, fn, *args):
        return self._client.call(fn, *args)

    def snapshot(self):
        return self._client.snapshot()

    def pending(self) -> int:
        return self._client.pending()

    def shutdown(self) -> None:
        self._client.shutdown()

    # ---- swapping ----------------------------------------------------------------------------
    def swap(self, new: EngineClient, drain_timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Send new requests to `new`; finish the old engine's replies, then shut it down."""
        with self._lock:
            old, self._client = self._client, new
            new.listeners[:] = old.listeners  # metrics keep seeing every request
            self._paused = None
        retire(old, drain_timeout)

    def stop_current(self, reason: str, drain_timeout: float = DRAIN_TIMEOUT_S) -> EngineClient:
        """Stop taking requests, let running ones finish, shut the engine down; returns it (stopped)."""
        with self._lock:
            self._paused = reason
        retire(self._client, drain_timeout)
        return self._client


def retire(client: EngineClient, drain_timeout: float) -> None:
    deadline = time.monotonic() + drain_timeout
    while client.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    client.shutdown()


@dataclass
class SwitchStatus:
    """Where a model switch is; read by the page while it runs."""

    model: str
    phase: str = "starting"  # starting | downloading | loading | ready | failed
    done_bytes: int = 0
    total_bytes: int = 0
    message: str = ""
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.phase in ("ready", "failed")


# start(name) -> a running engine client on that model (the app: a new EngineProcess).
# plan(new, current) -> "alongside" (both fit) or "replace" (only after the old is released);
# raises a ValueError (e.g. InsufficientMemoryError) when the new model does not fit either way.
Starter = Callable[[str], EngineClient]
Planner = Callable[[str, str], str]


class ModelSwitcher:
    def __init__(self, engine: SwitchableEngine, start: Starter, plan: Planner | None = None) -> None:
        self.engine = engine
        self.start = start
        self.plan = plan or (lambda new, current: "alongside")
        self.status: SwitchStatus | None = None
        self._lock = threading.Lock()

    def begin(self, name: str) -> SwitchStatus:
        """Start switching to `name` in the background (ValueError if a switch is already running)."""
        with self._lock:
            if self.status is not None and not self.status.finished:
                raise ValueError(f"the switch to {self.status.model} is still running; wait for it to finish")
            status = self.status = SwitchStatus(model=name)
        threading.Thread(target=self._run, args=(status,), name="localchat-model-switch", daemon=True).start()
        return status

    def switch(self, name: str) -> SwitchStatus:
        """Switch and wait (the CLI and tests)."""
        status = self.begin(name)
        status.done.wait()
        return status

    def _run(self, status: SwitchStatus) -> None:
        try:
            self._fetch(status)
            status.phase = "loading"
            current = self.engine.info.model_name
            if self.plan(status.model, current) == "alongside":
                self.engine.swap(self.start(status.model))
            else:
                self._replace(status.model, current)
            status.phase = "ready"
            status.message = f"now running {self.engine.info.model_name}"
        except Exception as exc:  # noqa: BLE001 - reported on the page; the old model keeps serving
            log.info("model switch to %s failed: %s", status.model, exc)
            status.phase, status.message = "failed", str(exc) or type(exc).__name__
        finally:
            status.done.set()

    def _fetch(self, status: SwitchStatus) -> None:
        from localchat.model import ModelNotFoundError, hub, resolve_model

        try:
            spec = resolve_model(status.model)
        except ModelNotFoundError:
            return  # not a registry model: starting it says what is wrong (or builds it some other way)
        if spec.source == "hub" and hub.local_snapshot(spec) is None:
            status.phase = "downloading"

            def report(done: int, total: int) -> None:
                status.done_bytes, status.total_bytes = done, total

            hub.download(spec, tqdm_class=hub.progress_reporter(report))

    def _replace(self, name: str, current: str) -> None:
        """Release the old engine first (both would not fit), then start the new one; on failure, restart
        the old one so the app keeps a model."""
        self.engine.stop_current(f"switching to {name}: try again in a moment")
        try:
            new = self.start(name)
        except Exception:
            self.engine.swap(self.start(current))
            raise
        self.engine.swap(new)
