"""Engine outputs as OpenAI response objects: whole completions, stream chunks, usage and timings.

Shapes follow OpenAI's chat.completion / chat.completion.chunk / text_completion objects. `usage`
carries `prompt_tokens_details.cached_tokens` (the prompt tokens the prefix cache served), and a
top-level `timings` object carries the figures llama.cpp's server reports (prompt_n, prompt_ms,
predicted_n, predicted_ms, ..._per_second), which front-ends such as Open WebUI show.
"""

from __future__ import annotations

import time
import uuid

from localchat.api.openai_schema import CHAT, ApiRequest
from localchat.engine import RequestOutput

MIN_LOGPROB = -9999.0  # JSON has no -Infinity: an impossible token is reported at this floor


class TokenText:
    """Each token id's own text (decoded alone, as the logprobs entries show it), cached."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


def _lp(value: float) -> float:
    return max(float(value), MIN_LOGPROB)


def usage(final: RequestOutput) -> dict:
    m = final.metrics
    completion = sum(len(o.token_ids) for o in final.outputs)
    return {
        "prompt_tokens": m.num_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": m.num_prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": m.prefix_hit_tokens},
    }


def timings(final: RequestOutput) -> dict:
    """llama.cpp's names. The prompt phase runs from arrival to the first token (queueing
    included) and computes prompt_n tokens (the cache served cache_n more); the generation phase
    runs from the first token to the end, and its rate leaves out each sample's first token,
    which the prompt phase produced."""
    m = final.metrics
    predicted_n = sum(len(o.token_ids) for o in final.outputs)
    prompt_n = m.num_prompt_tokens - m.prefix_hit_tokens
    prompt_s = (m.first_token_time - m.arrival_time) if m.first_token_time is not None else 0.0
    end = m.finished_time if m.finished_time is not None else time.perf_counter()
    predicted_s = (end - m.first_token_time) if m.first_token_time is not None else 0.0
    decoded = predicted_n - sum(1 for o in final.outputs if o.token_ids)
    return {
        "cache_n": m.prefix_hit_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": 1000 * prompt_s,
        "prompt_per_token_ms": 1000 * prompt_s / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_s if prompt_s > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": 1000 * predicted_s,
        "predicted_per_token_ms": 1000 * predicted_s / decoded if decoded > 0 else 0.0,
        "predicted_per_second": decoded / predicted_s if predicted_s > 0 and decoded > 0 else 0.0,
    }


def finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "stop"


class ResponseBuilder:
    """One request's responses: the whole object, or its stream of chunks (state kept per choice)."""

    def __init__(self, req: ApiRequest, token_text: TokenText) -> None:
        self.req = req
        self.chat = req.kind == CHAT
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.token_text = token_text
        self._started: set[int] = set()  # choices whose first chunk went out
        self._finished: set[int] = set()
        self._offsets: dict[int, int] = {}  # completions' text_offset so far, per choice

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.req.model}

    # ------------------------------------------------------------------ logprobs
    def _logprobs(self, o, start: int, end: int) -> dict | None:
        """Entries for output tokens [start, end) of one choice."""
        if not self.req.logprobs:
            return None
        ids = o.token_ids[start:end]
        lps = (o.logprobs or [])[start:end]
        tops = (o.top_logprobs or [])[start:end] if self.req.top_logprobs else [[] for _ in ids]
        texts = [self.token_text(t) for t in ids]
        if self.chat:
            content = [
                {"token": text, "logprob": _lp(lp), "bytes": list(text.encode()),
                 "top_logprobs": [self._alt(t, v) for t, v in top]}
                for text, lp, top in zip(texts, lps, tops)
            ]
            return {"content": content, "refusal": None}
        offset = self._offsets.get(o.index, 0)
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        self._offsets[o.index] = offset
        return {
            "tokens": texts,
            "token_logprobs": [_lp(lp) for lp in lps],
            "top_logprobs": [{self.token_text(t): _lp(v) for t, v in top} for top in tops] if self.req.top_logprobs else None,
            "text_offset": offsets,
        }

    def _alt(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode())}

    # ------------------------------------------------------------------ whole responses
    def complete(self, final: RequestOutput) -> dict:
        choices = []
        for o in sorted(final.outputs, key=lambda x: x.index):
            lp = self._logprobs(o, 0, len(o.token_ids))
            if self.chat:
                choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text, "refusal": None},
                                "logprobs": lp, "finish_reason": finish_reason(o.finish_reason)})
            else:
                choices.append({"index": o.index, "text": o.text, "logprobs": lp, "finish_reason": finish_reason(o.finish_reason)})
        body = self._head("chat.completion" if self.chat else "text_completion")
        body.update(choices=choices, usage=usage(final), timings=timings(final))
        return body

    # ------------------------------------------------------------------ streams
    def chunks(self, out: RequestOutput) -> list[dict]:
        """The chunks one engine update adds: one per choice that has news (text, tokens, an end)."""
        result = []
        for o in sorted(out.outputs, key=lambda x: x.index):
            if o.index in self._finished:
                continue
            first = o.index not in self._started
            reason = finish_reason(o.finish_reason)
            news = o.delta_text or (self.req.logprobs and o.delta_token_ids)
            if not (first or news or reason):
                continue
            self._started.add(o.index)
            if reason:
                self._finished.add(o.index)
            end = len(o.token_ids)
            lp = self._logprobs(o, end - len(o.delta_token_ids), end)
            result.append(self._chunk(o.index, o.delta_text, first, lp, reason))
        if out.finished and result and not self.req.include_usage:
            result[-1]["timings"] = timings(out)  # where llama.cpp's server puts them
        return result

    def _chunk(self, index: int, text: str, first: bool, lp: dict | None, reason: str | None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        if self.req.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        return body

    def final_chunk(self, final: RequestOutput) -> dict | None:
        """With stream_options.include_usage: a last chunk with no choices, the usage and timings."""
        if not self.req.include_usage:
            return None
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage(final), timings=timings(final))
        return body
