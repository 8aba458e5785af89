"""Requests as the engine takes them, and building them from what a client sends.

A RequestFactory validates and tokenizes on the client's side, before anything reaches the engine's
loop: the in-process driver and the engine process's parent hold one each, built from the engine's
EngineInfo, so a bad request fails on the caller's thread with a clear RequestError.
"""

from __future__ import annotations

import itertools
import math
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
    # Set when the engine fails this request (a fault in its step, non-finite logits): it is over.
    error: str | None = None

    @property
    def finished(self) -> bool:
        if self.error is not None:
            return True
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
    # False for an engine behind an OpenAI-compatible server (localchat/api/remote.py): it takes
    # chat messages, not token ids, and reports text without ids; there is no local tokenizer.
    accepts_token_ids: bool = True

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
        self.check_fits(len(ids), params)
        return Request(rid, ids, params, RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(ids)))

    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        """Refuse now (RequestError) a request the engine could never complete, rather than let it wait
        forever or be cut short: a prompt beyond the context, or a reply (every beam, for a beam search)
        that the whole KV pool could not hold. The message names the largest value that would fit."""
        limit = self.info.max_model_len
        if prompt_len >= limit:
            raise RequestError(
                f"the prompt has {prompt_len} tokens but the model's context holds {limit}: "
                "shorten it or start a new conversation"
            )
        capacity = self.info.kv_capacity_tokens
        if prompt_len + 1 > capacity:
            raise RequestError(f"the prompt has {prompt_len} tokens but the KV cache holds only {capacity}: raise --kv-cache-gb")
        total = min(prompt_len + params.max_tokens, limit)  # generation stops at the context's end anyway
        if total > capacity:
            raise RequestError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) needs {total} tokens of KV "
                f"cache, but it holds only {capacity}: use max_tokens {capacity - prompt_len} or less, or raise --kv-cache-gb"
            )
        if params.is_beam_search:
            blocks, block_size = self.info.num_blocks, self.info.block_size
            needed = beam_blocks(prompt_len, total, params.beam_width, block_size)
            if needed > blocks:
                widest = max((w for w in range(1, params.beam_width) if beam_blocks(prompt_len, total, w, block_size) <= blocks), default=1)
                raise RequestError(
                    f"beam search with {params.beam_width} beams of up to {total} tokens needs {needed} KV blocks at once, "
                    f"but the cache has {blocks}: use beam_width {widest} or less, lower max_tokens, or raise --kv-cache-gb"
                )


def beam_blocks(prompt_len: int, total_tokens: int, width: int, block_size: int) -> int:
    """KV blocks `width` beams of up to `total_tokens` hold at once: the prompt's full blocks are shared,
    each beam owns the rest (every beam advances in the same step, so all of them must fit together)."""
    shared = prompt_len // block_size
    own = math.ceil((total_tokens - shared * block_size) / block_size)
    return shared + width * own
