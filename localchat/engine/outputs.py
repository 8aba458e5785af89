"""What the engine reports for each request after every step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float
    logprobs: list[float] | None = None
    # With params.top_logprobs: per generated token, the most likely (token id, logprob) pairs.
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # What is new since the previous report for this request.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_generated_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.first_token_time is None or self.finished_time is None or self.num_generated_tokens < 2:
            return None
        elapsed = self.finished_time - self.first_token_time
        return (self.num_generated_tokens - 1) / elapsed if elapsed > 0 else None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Why the engine failed this request (a fault in its step, non-finite logits); it is then
    # finished, its blocks are free, and each output's finish_reason is "error".
    error: str | None = None


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two reports of one request as one: the newer state, with what is new since the older one's previous
    report (its deltas joined); a completion the newer report leaves out keeps its older entry."""
    earlier = {o.index: o for o in older.outputs}
    outputs = []
    for o in newer.outputs:
        before = earlier.pop(o.index, None)
        if before is not None and (before.delta_text or before.delta_token_ids):
            o = replace(o, delta_text=before.delta_text + o.delta_text,
                        delta_token_ids=before.delta_token_ids + o.delta_token_ids)
        outputs.append(o)
    outputs.extend(earlier.values())
    outputs.sort(key=lambda o: o.index)
    return replace(newer, outputs=outputs)


class OutputBatcher:
    """Reports of several engine steps handed on together, at most every `interval_s`.

    Each hand-over to another process wakes a thread there, and on a machine with as many cores as
    the engine has threads that thread takes a core from the engine in the middle of a step
    (localchat/bench/page.py measured the page's reply at 0.76x `generate` with a hand-over per
    token). A person reads no faster than a few updates a second, so reports wait here, merged per
    request, except those that must not wait: a request's first tokens (its time to first token),
    its end, and everything once the engine has nothing left to compute.
    """

    def __init__(self, send: Callable[[list[RequestOutput]], None], interval_s: float) -> None:
        self.send, self.interval_s = send, interval_s
        self.pending: dict[str, RequestOutput] = {}
        self.urgent = False
        self.sent_at = 0.0
        self.started: set[str] = set()  # requests whose first tokens were handed on

    def add(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            rid = out.request_id
            if rid not in self.started and any(o.token_ids for o in out.outputs):
                self.started.add(rid)
                self.urgent = True
            if out.finished:
                self.started.discard(rid)
                self.urgent = True
            before = self.pending.get(rid)
            self.pending[rid] = out if before is None else merge_outputs(before, out)

    def flush_if_due(self, *, idle: bool) -> None:
        if self.pending and (idle or self.urgent or time.monotonic() - self.sent_at >= self.interval_s):
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        outputs, self.pending, self.urgent = list(self.pending.values()), {}, False
        self.sent_at = time.monotonic()
        self.send(outputs)
