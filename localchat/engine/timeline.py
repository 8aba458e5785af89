"""A small ring buffer of the block pool's recent history, for the memory panel's timeline.

The block manager samples (blocks used, cached, shared) at most every `interval_s` while blocks
change, and records the moments of forks, copy-on-write copies and preemptions. The buffer holds the
last few minutes; reading it never changes it. Times are this process's monotonic clock: a reader in
another process compares them with `TimelineView.now`, never with its own clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

EVENT_KINDS = ("fork", "cow", "preempt")


@dataclass(frozen=True)
class TimelineView:
    """What the buffer held at `now`: samples (t, used, cached, shared) and events (t, kind, seq_id)."""

    now: float
    samples: tuple[tuple[float, int, int, int], ...]
    events: tuple[tuple[float, str, int | None], ...]


class Timeline:
    def __init__(self, interval_s: float = 0.25, max_samples: int = 1200, max_events: int = 2000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.samples: deque[tuple[float, int, int, int]] = deque(maxlen=max_samples)
        self.events: deque[tuple[float, str, int | None]] = deque(maxlen=max_events)
        self._last = float("-inf")

    def due(self) -> bool:
        """Whether a sample would be recorded now (callers skip counting blocks when it would not)."""
        return self.clock() - self._last >= self.interval_s

    def sample(self, used: int, cached: int, shared: int) -> None:
        now = self.clock()
        self._last = now
        if self.samples and self.samples[-1][1:] == (used, cached, shared) and now - self.samples[-1][0] < 5.0:
            return  # nothing changed: a flat line needs no new point (one every 5 s keeps it current)
        self.samples.append((now, used, cached, shared))

    def event(self, kind: str, seq_id: int | None = None) -> None:
        self.events.append((self.clock(), kind, seq_id))

    def view(self, since: float | None = None) -> TimelineView:
        """Samples and events newer than `since` (all when None)."""
        if since is None:
            return TimelineView(self.clock(), tuple(self.samples), tuple(self.events))
        return TimelineView(
            self.clock(),
            tuple(s for s in self.samples if s[0] > since),
            tuple(e for e in self.events if e[0] > since),
        )
