"""OpenAI request bodies in, checked values out: `parse_request` (no engine needed) and `prepare`
(tokenizes through localchat/model/chat_template.py, resolves max_tokens against the context).

Every rejection is an APIError naming the parameter. Fields that OpenAI defines but this engine
cannot honour (tools, logit_bias, ...) are refused when set to anything but their neutral value;
fields nobody defines are refused as OpenAI refuses them, so a typo never passes silently.
Beyond OpenAI, the sampling knobs that vLLM and llama.cpp's server also take (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`) are accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from localchat import settings
from localchat.api.errors import APIError, bad_value, context_exceeded, unknown_argument, unsupported
from localchat.engine import SamplingParams
from localchat.model import chat_template

CHAT, COMPLETION = "chat", "completion"
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "logprobs", "top_k", "min_p", "repetition_penalty", "ignore_eos"}
FIELDS = {
    CHAT: COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
    COMPLETION: COMMON | {"prompt"},
}
# Metadata that changes nothing about the reply.
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "parallel_tool_calls"}
# Defined by OpenAI, not done here: allowed only at their neutral value.
NEUTRAL = {
    CHAT: {"tools": ([], None), "tool_choice": ("none", "auto", None), "functions": ([], None), "function_call": ("none", None),
           "logit_bias": ({}, None), "response_format": ({"type": "text"}, None), "modalities": (["text"], None),
           "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
           "verbosity": (None,), "moderation": (None,)},
    COMPLETION: {"echo": (False, None), "suffix": (None, ""), "logit_bias": ({}, None)},
}
SEED_RANGE = (-(2**63), 2**63 - 1 - settings.MAX_SAMPLES)  # torch generators take 64 bits; sample i uses seed + i


@dataclass
class ApiRequest:
    """A checked request: what to prompt with and how to sample (max_tokens resolved in `prepare`)."""

    kind: str
    model: str
    messages: list[dict] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None
    sampling: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams


# ------------------------------------------------------------------ values
def _present(body: dict, name: str) -> bool:
    return body.get(name) is not None


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_value(name, f"'{name}' must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise bad_value(name, f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_value(name, f"'{name}' must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_value(name, f"'{name}' must be {span}, got {value}")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_value(name, f"'{name}' must be true or false, got {value!r}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_value("stop", "'stop' must be a non-empty string or a list of non-empty strings")
    if len(items) > settings.API_MAX_STOP:
        raise bad_value("stop", f"'stop' takes at most {settings.API_MAX_STOP} strings, got {len(items)}")
    return tuple(items)


# ------------------------------------------------------------------ the body
def check_fields(kind: str, body: dict) -> None:
    for name, value in body.items():
        if name in FIELDS[kind] or name in IGNORED:
            continue
        neutral = NEUTRAL[kind].get(name)
        if neutral is None:
            raise unknown_argument(name)
        if value not in neutral:
            raise unsupported(name, "this local engine generates plain text only")


def check_model(body: dict, served: list[str]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "You must provide a model parameter (GET /v1/models lists them).", param="model", code="missing_model")
    if model not in served:
        raise APIError(404, f"The model '{model}' does not exist here; this server serves: {', '.join(served)}.",
                       param="model", code="model_not_found")
    return model


def parse_request(kind: str, body: object, served: list[str]) -> ApiRequest:
    """Check an OpenAI body (already parsed from JSON); raise APIError with the parameter at fault."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    check_fields(kind, body)
    req = ApiRequest(kind=kind, model=check_model(body, served))
    if kind == CHAT:
        req.messages = normalize_messages(body.get("messages"))
        req.max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
    else:
        req.prompt, req.prompt_token_ids = _prompt(body.get("prompt"))
        req.max_tokens = _integer(body, "max_tokens", 1)
    req.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise bad_value("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(options, dict):
            raise bad_value("stream_options", "'stream_options' must be an object")
        req.include_usage = bool(options.get("include_usage", False))
    _logprobs(kind, body, req)
    req.sampling = _sampling(body)
    return req


def _logprobs(kind: str, body: dict, req: ApiRequest) -> None:
    most = settings.MAX_TOP_LOGPROBS
    if kind == CHAT:
        req.logprobs = _boolean(body, "logprobs")
        req.top_logprobs = _integer(body, "top_logprobs", 0, most) or 0
        if req.top_logprobs and not req.logprobs:
            raise bad_value("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:
        # The legacy endpoint's logprobs is a count: the chosen token's logprob plus that many alternatives.
        count = _integer(body, "logprobs", 0, settings.API_MAX_COMPLETION_LOGPROBS)
        req.logprobs, req.top_logprobs = count is not None, count or 0


def _sampling(body: dict) -> dict:
    n = _integer(body, "n", 1)
    if n is not None and n > settings.MAX_SAMPLES:
        raise bad_value("n", f"'n' must be at most {settings.MAX_SAMPLES} (samples of one request), got {n}")
    seed = _integer(body, "seed", *SEED_RANGE)
    return {
        "temperature": _number(body, "temperature", 0.0, 2.0, settings.DEFAULT_TEMPERATURE),
        "top_p": _top_p(body),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        "top_k": _integer(body, "top_k", -1) or 0,
        "min_p": _number(body, "min_p", 0.0, 1.0, 0.0),
        "repetition_penalty": _number(body, "repetition_penalty", 0.01, 10.0, 1.0),
        "ignore_eos": _boolean(body, "ignore_eos"),
        "seed": seed,
        "stop": _stop(body),
        "n": n or 1,
    }


def _top_p(body: dict) -> float:
    top_p = _number(body, "top_p", 0.0, 1.0, settings.DEFAULT_TOP_P)
    if top_p == 0:
        raise bad_value("top_p", "'top_p' must be above 0 (use temperature 0 for greedy decoding)")
    return top_p


def _prompt(value) -> tuple[str | None, list[int] | None]:
    """One prompt: a string, a list of one string, or a list of token ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise bad_value("prompt", "'prompt' is empty")
        return value, None
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None, list(value)
    if isinstance(value, list) and len(value) > 1:
        raise unsupported("prompt", "send one prompt per request (several prompts in one request are not batched here)")
    raise bad_value("prompt", "'prompt' must be a non-empty string or a list of token ids")


def normalize_messages(messages) -> list[dict]:
    """OpenAI's message shapes (text parts, the "developer" role) as the chat template takes them."""
    if not isinstance(messages, list) or not messages:
        raise bad_value("messages", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_value(f"messages[{i}]", f"messages[{i}] must be an object with a role and content")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in chat_template.ROLES:
            raise bad_value(f"messages[{i}].role", f"messages[{i}].role must be system, developer, user or assistant, got {m.get('role')!r}")
        if m.get("tool_calls") or m.get("function_call"):
            raise unsupported(f"messages[{i}].tool_calls", "this local engine generates plain text only")
        out.append({"role": role, "content": _text(m.get("content"), i, role)})
    try:
        chat_template.check_messages(out)
    except ValueError as exc:
        raise bad_value("messages", str(exc)) from None
    return out


def _text(content, i: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise unsupported(f"messages[{i}].content", f"only text parts are understood, got {kind!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_value(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


# ------------------------------------------------------------------ prompt and limits
def prompt_ids(req: ApiRequest, tokenizer, vocab_size: int) -> list[int]:
    if req.messages is not None:
        return chat_template.prompt_ids(tokenizer, req.messages)
    if req.prompt is not None:
        return chat_template.encode(tokenizer, req.prompt)
    ids = req.prompt_token_ids or []
    if any(t < 0 or t >= vocab_size for t in ids):
        raise bad_value("prompt", f"token ids in 'prompt' must be in [0, {vocab_size})")
    return ids


def prepare(req: ApiRequest, tokenizer, vocab_size: int, max_model_len: int) -> Prepared:
    """Tokenize and size the request: max_tokens defaults to what the context leaves (chat) or
    OpenAI's 16 (completions); a prompt plus max_tokens beyond the context is refused, as OpenAI does."""
    ids = prompt_ids(req, tokenizer, vocab_size)
    param = "messages" if req.kind == CHAT else "prompt"
    if not ids:
        raise bad_value(param, "the prompt is empty")
    room = max_model_len - len(ids)
    if room < 1:
        raise context_exceeded(max_model_len, len(ids), None, param)
    if req.max_tokens is None:
        max_tokens = room if req.kind == CHAT else min(room, settings.API_COMPLETION_DEFAULT_MAX_TOKENS)
    elif req.max_tokens > room:
        raise context_exceeded(max_model_len, len(ids), req.max_tokens, param)
    else:
        max_tokens = req.max_tokens
    try:
        params = SamplingParams(max_tokens=max_tokens, logprobs=req.logprobs, top_logprobs=req.top_logprobs, **req.sampling)
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None
    return Prepared(ids, params)
