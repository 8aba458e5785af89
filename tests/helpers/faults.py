"""Faults injected into a real engine's steps: the forward pass raising (before or after it wrote K/V)
and rows of non-finite logits, as a broken kernel or an overflow would produce them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


class InjectedFault(RuntimeError):
    """What the injector raises in place of a kernel error or an out-of-memory."""


@dataclass
class FaultInjector:
    """Wraps `engine.runner.execute`. Each step, with probability `rate`, one fault: raise before the
    forward pass, raise after it (its K/V already written), or NaN/inf in one completing row.
    `hit` collects the request ids each fault touched (a step's requests, or one row's request)."""

    engine: object
    rate: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = ("raise_before", "raise_after", "nan_row", "inf_row")
    hit: set[str] = field(default_factory=set)
    faults: list[str] = field(default_factory=list)
    # Faults asked for by step number (engine.steps counts only steps that ran): {step: kind}.
    at: dict[int, str] = field(default_factory=dict)
    calls: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._execute = self.engine.runner.execute
        self.engine.runner.execute = self.execute
        self._warm_up = self.engine.warm_up
        self.engine.warm_up = self.warm_up

    def warm_up(self) -> None:
        """An engine process warms its engine up before the first request (localchat/engine/process.py): those
        forward passes are not the requests' that a test counts, and get no faults."""
        self.engine.runner.execute = self._execute
        try:
            self._warm_up()
        finally:
            self.engine.runner.execute = self.execute

    def execute(self, work, copies):
        call = self.calls
        self.calls += 1
        kind = self.at.pop(call, None)
        if kind is None and self.rate and self._rng.random() < self.rate:
            kind = self._rng.choice(self.kinds)
        if kind == "raise_before":
            self._record(kind, {w.seq.request_id for w in work})
            raise InjectedFault("injected kernel error before the forward pass")
        logits = self._execute(work, copies)
        if kind == "raise_after":
            self._record(kind, {w.seq.request_id for w in work})
            raise torch.cuda.OutOfMemoryError("injected: out of memory for activations")
        completing = [w.seq for w in work if w.completes_sequence]
        if kind in ("nan_row", "inf_row") and completing:
            row = self._rng.randrange(len(completing))
            logits = logits.clone()
            logits[row, self._rng.randrange(logits.shape[-1])] = float("nan") if kind == "nan_row" else float("inf")
            self._record(kind, {completing[row].request_id})
        return logits

    def _record(self, kind: str, request_ids: set[str]) -> None:
        self.faults.append(kind)
        self.hit |= request_ids


def faulty_tiny_engine(*, fault_at: dict[int, str] | None = None, **kwargs):
    """A tiny engine (helpers/tiny.py) whose forward pass faults at the given calls: a module-level
    factory, so an engine process can build it."""
    from helpers.tiny import tiny_engine

    engine = tiny_engine(**kwargs)
    engine.fault_injector = FaultInjector(engine, at=dict(fault_at or {}))
    return engine


def blocks_used(engine) -> int:
    """For EngineClient.call across a process (a module-level function pickles; a lambda does not)."""
    return engine.block_manager.figures().blocks_used
