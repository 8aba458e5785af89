"""Gradio's event queue, woken by its events instead of polling.

Gradio 6's queue looks for new events every millisecond, whether or not there are any (its
`start_processing` loop sleeps `sleep_when_free` between looks). On this project's two-core machines
every wake-up of the server's event loop is CPU taken from the engine's threads: at 1 ms it cost 3-5%
of a core with nothing to do, and still 1.2-1.6% at the 20 ms this module used to set.

Here the loop's idle sleep is a wait on an asyncio event that the queue sets when an event is pushed
and when a job ends, the only two things that give the loop work; the wait also ends after
`settings.UI_QUEUE_IDLE_S`, so if a Gradio release adds another path the queue is slower, never stuck.
When Gradio's queue lacks what this relies on, it is left to poll every `settings.UI_QUEUE_POLL_S`.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Self

from localchat import settings


class IdleWait(float):
    """The queue's `sleep_when_free`: still a number of seconds for any code that sleeps on it, and,
    to the patched `asyncio.sleep` of gradio.queueing, a wait for the queue's next piece of work."""

    wake: asyncio.Event | None
    waits: int  # how many times the queue has waited (tests: an idle queue waits rarely)

    def __new__(cls, timeout: float) -> Self:
        wait = super().__new__(cls, timeout)
        wait.wake, wait.waits = None, 0
        return wait

    def notify(self) -> None:
        if self.wake is not None:
            self.wake.set()

    async def wait(self) -> None:
        self.waits += 1
        if self.wake is None:
            self.wake = asyncio.Event()  # made here: bound to the server's event loop, where the queue runs
        if not self.wake.is_set():
            try:
                await asyncio.wait_for(self.wake.wait(), float(self))
            except asyncio.TimeoutError:
                pass
        self.wake.clear()


class _QueueAsyncio:
    """gradio.queueing's view of asyncio: the same module, but a sleep on an IdleWait waits for work."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def sleep(self, delay, result=None):
        if isinstance(delay, IdleWait):
            await delay.wait()
            return result
        return await self._real.sleep(delay, result)


def _notifying(method, idle: IdleWait):
    @functools.wraps(method)
    async def call(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        finally:
            idle.notify()

    return call


def quiet_queue(demo) -> bool:
    """Make `demo`'s queue (after demo.queue(), before launch) wait for work instead of polling; returns
    whether it could (otherwise it polls every UI_QUEUE_POLL_S)."""
    from gradio import queueing

    queue = getattr(demo, "_queue", None)
    if queue is None or not hasattr(queue, "sleep_when_free"):
        return False
    queue.progress_update_sleep_when_free = max(getattr(queue, "progress_update_sleep_when_free", 0.0), 0.5)
    if not all(callable(getattr(queue, name, None)) for name in ("push", "process_events", "start_processing")):
        queue.sleep_when_free = max(queue.sleep_when_free, settings.UI_QUEUE_POLL_S)
        return False
    if not isinstance(queueing.asyncio, _QueueAsyncio):
        queueing.asyncio = _QueueAsyncio(queueing.asyncio)
    idle = IdleWait(settings.UI_QUEUE_IDLE_S)
    queue.sleep_when_free = idle
    queue.push = _notifying(queue.push, idle)  # a new event
    queue.process_events = _notifying(queue.process_events, idle)  # a job ended: a worker is free again
    return True
