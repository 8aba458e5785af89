"""Errors as OpenAI's API sends them: `{"error": {"message", "type", "param", "code"}}` and an HTTP status.

Clients (the official `openai` package, editors, agents) turn the status into an exception class
(400 BadRequestError, 401 AuthenticationError, 404 NotFoundError...) and show `message` to the user,
so the message says what to change.
"""

from __future__ import annotations

import json


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _type_for(status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def _type_for(status: int) -> str:
    # OpenAI sends invalid_request_error for every 4xx, a wrong API key included.
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_value(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def unsupported(param: str, why: str = "") -> APIError:
    text = f"'{param}' is not supported by this server"
    return APIError(400, text + (f": {why}" if why else ""), param=param, code="unsupported_parameter")


def unknown_argument(param: str) -> APIError:
    return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")


def context_exceeded(limit: int, prompt_tokens: int, max_tokens: int | None, param: str) -> APIError:
    if max_tokens is None:
        text = f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_tokens} tokens."
    else:
        text = (f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
                "Please reduce the length of the prompt or of max_tokens.")
    return APIError(400, text, param=param, code="context_length_exceeded")
