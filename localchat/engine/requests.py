"""Requests as the engine takes them, and building them from what a client sends.

A RequestFactory validates and tokenizes on the client's side, before anything reaches the engine's
loop: the in-process driver and the engine process's parent hold one each, built from the engine's
EngineInfo, so a bad request fails on the caller's thread with a clear RequestError.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from localchat.engine.outputs import RequestMetrics
from localchat.engine.sampling_params import SamplingParams
from localchat.engine.sequence import Sequence
from localchat.model import chat_template


class RequestError(ValueError):
    """A request the engine cannot serve (empty, too long, ...); the engine stays usable."""


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    beam: object | None = None  # localchat.engine.beam_search.BeamSearch for beam requests
    aborted: bool = False
    # Continue from the live sequence of this request (sharing its blocks), then prompt_token_ids.
    fork_from: str | None = None

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return bool(self.seqs) and all(s.is_finished for s in self.seqs) and (self.forked or self.params.n == 1)


@dataclass
class EngineInfo:
    """What a client of the engine needs to know about it (sent once from an engine process)."""

    model_name: str
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int
    dtype: str
    device: str
    kv_cache_bytes: int
    details: dict = field(default_factory=dict)  # weights format, bytes per token...

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


class RequestFactory:
    """Validate and tokenize requests for one engine, without touching its state (safe from any thread)."""

    def __init__(self, info: EngineInfo, prefix: str = "req") -> None:
        self.info = info
        self._ids = itertools.count()
        self._prefix = prefix

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        try:
            return chat_template.prompt_ids(self.info.tokenizer, messages)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def _check_ids(self, prompt_token_ids) -> list[int]:
        try:
            ids = [int(t) for t in prompt_token_ids]
        except (TypeError, ValueError):
            raise RequestError("prompt_token_ids must be a list of integers") from None
        if not ids:
            raise RequestError("the prompt is empty: prompt_token_ids has no tokens")
        vocab = self.info.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt_token_ids must be in [0, {vocab})")
        return ids

    def make(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        fork_from: str | None = None,
    ) -> Request:
        """A request from exactly one of prompt, messages or prompt_token_ids.

        With `fork_from`, the request continues the running request of that id from wherever it
        is: it shares all its blocks, and `prompt_token_ids` (may be empty) are appended.
        """
        params = params or SamplingParams()
        rid = request_id if request_id is not None else f"{self._prefix}-{next(self._ids)}"
        if fork_from is not None:
            extra = [int(t) for t in (prompt_token_ids or [])]
            return Request(rid, extra, params, RequestMetrics(arrival_time=time.perf_counter()), fork_from=fork_from)
        if sum(x is not None for x in (prompt, messages, prompt_token_ids)) != 1:
            raise RequestError("give exactly one of prompt, messages or prompt_token_ids")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError("the prompt is empty: write a message first")
            ids = self._prompt_ids([{"role": "user", "content": prompt}])
        elif messages is not None:
            ids = self._prompt_ids(messages)
        else:
            ids = self._check_ids(prompt_token_ids)
        limit = self.info.max_model_len
        if len(ids) >= limit:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the model's context holds {limit}: "
                "shorten it or start a new conversation"
            )
        capacity = self.info.kv_capacity_tokens
        if len(ids) + 1 > capacity:
            raise RequestError(f"the prompt has {len(ids)} tokens but the KV cache holds only {capacity}: raise --kv-cache-gb")
        return Request(rid, ids, params, RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(ids)))
