"""A remote OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, another localchat) driven
through the EngineClient API, so the same ChatService and UI run against it.

Each request streams `/v1/chat/completions` (messages in, `n` choices, usage at the end) on a
thread of its own, and its chunks come back as RequestOutputs through EngineClient._deliver,
like a local engine's steps. The server tokenizes: EngineInfo.accepts_token_ids is False, so the
chat service sends messages and saves replies without token ids. `snapshot()` reads the server's
/metrics (localchat/api/remote_metrics.py) for the memory panel; nothing else of the engine is
reachable (`call` refuses).
"""

from __future__ import annotations

import itertools
import json
import math
import logging
import threading
import time

import httpx

from localchat.api.remote_metrics import RemoteSnapshot, read_metrics
from localchat.engine import (CompletionOutput, EngineClient, EngineInfo, EngineStopped, RequestError, RequestMetrics,
                              RequestOutput, RequestStream, SamplingParams)
from localchat.model import chat_template
from localchat import settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # between two chunks: a busy server may queue a request for long


def api_base(url: str) -> str:
    """The server's root (no trailing slash, no /v1): both spellings are common in settings."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--engine-url must start with http:// or https://, got {url!r}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def request_body(model: str, messages: list[dict], params: SamplingParams) -> dict:
    """OpenAI's fields for our sampling parameters; the extras vLLM and llama.cpp take only when set."""
    if params.is_beam_search:
        raise RequestError("beam search is not available on a remote engine")
    body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p, "n": params.n}
    optional = {"seed": params.seed, "stop": list(params.stop) or None,
                "presence_penalty": params.presence_penalty or None, "frequency_penalty": params.frequency_penalty or None,
                "top_k": params.top_k if params.top_k > 0 else None, "min_p": params.min_p or None,
                "repetition_penalty": params.repetition_penalty if params.repetition_penalty != 1.0 else None,
                "ignore_eos": params.ignore_eos or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return f"the engine server answered {response.status_code}: {message or response.text[:300] or response.reason_phrase}"


class _Choices:
    """What one request has received so far, per choice index."""

    def __init__(self) -> None:
        self.text: dict[int, str] = {}
        self.reason: dict[int, str | None] = {}
        self.usage: dict | None = None

    def add(self, chunk: dict) -> dict[int, str]:
        deltas: dict[int, str] = {}
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index", 0))
            piece = (choice.get("delta") or {}).get("content") or ""
            self.text[index] = self.text.get(index, "") + piece
            deltas[index] = deltas.get(index, "") + piece
            if choice.get("finish_reason"):
                self.reason[index] = choice["finish_reason"]
            else:
                self.reason.setdefault(index, None)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        return deltas


class RemoteEngineClient(EngineClient):
    def __init__(self, url: str, api_key: str | None = None, model: str | None = None) -> None:
        self.base = api_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base, headers=headers,
                                  timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S))
        self._responses: dict[str, httpx.Response] = {}
        self._cancelled: set[str] = set()
        self._snapshot: RemoteSnapshot | None = None
        self._snapshot_at = 0.0
        self._ids = itertools.count()
        super().__init__(self._discover(model))

    def _discover(self, model: str | None) -> EngineInfo:
        try:
            response = self._http.get("/v1/models", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise EngineStopped(f"cannot reach the engine server at {self.base}: {exc}") from None
        if response.status_code != 200:
            raise ValueError(_error_message(response))
        cards = [c for c in response.json().get("data", []) if isinstance(c, dict) and c.get("id")]
        names = [c["id"] for c in cards]
        if model is not None and model not in names:
            raise ValueError(f"the engine server at {self.base} does not serve {model!r} (it serves: {', '.join(names) or 'nothing'})")
        if not cards:
            raise ValueError(f"the engine server at {self.base} lists no models")
        card = cards[names.index(model)] if model else cards[0]
        return EngineInfo(model_name=card["id"], tokenizer=None, vocab_size=0,
                          max_model_len=int(card.get("max_model_len") or 0), num_blocks=0, block_size=0, dtype="",
                          device=f"remote {self.base}", kv_cache_bytes=0, details={"remote_url": self.base},
                          accepts_token_ids=False)

    # ------------------------------------------------------------------ EngineClient
    def submit(self, prompt: str | None = None, *, messages: list[dict] | None = None, params: SamplingParams | None = None,
               request_id: str | None = None, prompt_token_ids=None, fork_from=None):
        if self._stopped:
            raise EngineStopped(self._stopped)
        if prompt_token_ids is not None or fork_from is not None:
            raise RequestError("a remote engine takes chat messages, not token ids")
        if (prompt is None) == (messages is None):
            raise RequestError("give exactly one of prompt or messages")
        messages = [{"role": "user", "content": prompt}] if prompt is not None else messages
        try:
            chat_template.check_messages(messages)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        params = params or SamplingParams()
        body = request_body(self.info.model_name, messages, params)
        rid = request_id or f"remote{id(self) % 10_000}-{next(self._ids)}"
        with self._lock:
            if rid in self._streams:
                raise RequestError(f"request id {rid!r} is already in use")
            stream = self._streams[rid] = RequestStream(self, rid)
        threading.Thread(target=self._run, args=(rid, body), name=f"localchat-remote-{rid}", daemon=True).start()
        return stream

    def _send(self, kind: str, payload) -> None:
        if kind == "abort":
            self._cancel(payload)

    def _cancel(self, rid: str) -> None:
        with self._lock:
            self._cancelled.add(rid)
            response = self._responses.get(rid)
        if response is not None:
            response.close()  # wakes the reading thread; the server sees the disconnect and aborts

    def call(self, fn, *args):
        raise RuntimeError("the engine runs on a remote server: its internals are not reachable from here")

    def snapshot(self) -> RemoteSnapshot:
        """What the server's /metrics says now (re-read at most every REMOTE_METRICS_MAX_AGE_S)."""
        now = time.monotonic()
        if self._snapshot is None or now - self._snapshot_at >= settings.REMOTE_METRICS_MAX_AGE_S:
            self._snapshot = read_metrics(self._http, self.base, self.info.model_name)
            self._snapshot_at = now
        return self._snapshot

    def shutdown(self) -> None:
        self._stopped = self._stopped or "the remote engine client has been shut down"
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            self._cancel(rid)
        self._fail_all(EngineStopped(self._stopped))
        self._http.close()

    # ------------------------------------------------------------------ one request
    def _run(self, rid: str, body: dict) -> None:
        started = time.perf_counter()
        got = _Choices()
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                with self._lock:
                    self._responses[rid] = response
                if response.status_code != 200:
                    response.read()
                    raise RequestError(_error_message(response))
                for chunk in _events(response):
                    if "error" in chunk:
                        raise RequestError(f"the engine server failed: {chunk['error'].get('message', chunk['error'])}")
                    deltas = got.add(chunk)
                    if deltas:
                        self._deliver([self._output(rid, got, deltas, started, final=False)])
        except Exception as exc:  # noqa: BLE001 - whatever breaks, the stream must end, never hang
            if rid not in self._cancelled:
                self._fail(rid, exc if isinstance(exc, RequestError) else EngineStopped(f"the engine server connection failed: {exc}"))
                return
        finally:
            with self._lock:
                self._responses.pop(rid, None)
        if rid in self._cancelled:
            for index, reason in got.reason.items():
                got.reason[index] = reason or "abort"
            got.reason.setdefault(0, "abort")
        self._cancelled.discard(rid)
        self._deliver([self._output(rid, got, {}, started, final=True)])

    def _output(self, rid: str, got: _Choices, deltas: dict[int, str], started: float, final: bool) -> RequestOutput:
        outs = [CompletionOutput(index=i, text=got.text.get(i, ""), token_ids=[],
                                 finish_reason=(got.reason.get(i) or "stop") if final else got.reason.get(i),
                                 cumulative_logprob=math.nan, delta_text=deltas.get(i, ""))  # not sent by the server
                for i in sorted(got.reason)]
        usage = got.usage or {}
        stream = self._streams.get(rid)
        metrics = RequestMetrics(
            arrival_time=started,
            first_token_time=stream.first_token_at if stream is not None else None,
            finished_time=time.perf_counter() if final else None,
            num_prompt_tokens=int(usage.get("prompt_tokens") or 0),
            prefix_hit_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            # usage counts all choices together: a per-sample count is known only for one choice
            num_generated_tokens=int(usage.get("completion_tokens") or 0) if len(outs) == 1 else 0,
        )
        return RequestOutput(rid, [], outs, final, metrics)


def _events(response: httpx.Response):
    """The JSON payloads of a server-sent event stream, up to [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError:
            log.warning("skipping a malformed event from the engine server: %.200s", data)
