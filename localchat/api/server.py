"""The OpenAI-compatible HTTP API over one engine client: /v1/models, /v1/chat/completions,
/v1/completions, /metrics and /health.

It sits beside the UI, never under it: requests arrive as messages or prompt text, are tokenized
through localchat/model/chat_template.py (localchat/api/openai_schema.py) and submitted to the
same EngineClient the UI uses (`localchat app` mounts these routes on the page's server), so API
traffic shares the prefix cache and shows in the memory panel. `n` samples are the engine's forks
of one prefilled prompt. A client that goes away mid-reply aborts its request, which frees its blocks.
"""

from __future__ import annotations

import json
import logging
import secrets
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from localchat.api.errors import APIError
from localchat.api.metrics import ApiMetrics
from localchat.api.openai_schema import CHAT, COMPLETION, ApiRequest, parse_request, prepare
from localchat.api.responses import ResponseBuilder, TokenText
from localchat.engine import EngineClient, EngineStopped, RequestError, RequestStream

log = logging.getLogger(__name__)

DISCONNECT_CHECK_S = 0.5  # a non-streamed request looks for a vanished client at most this often


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, EngineStopped):
        return APIError(503, f"The engine is not running: {exc}", code="engine_unavailable")
    if isinstance(exc, (RequestError, ValueError)):
        return APIError(400, str(exc), code="invalid_value")
    log.exception("request failed", exc_info=exc)
    return APIError(500, f"The engine failed on this request ({type(exc).__name__}: {exc}).", code="internal_error")


def _abort(stream: RequestStream) -> None:
    try:
        stream.abort()
    except EngineStopped:
        pass  # nothing left to free


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EngineEventStream(StreamingResponse):
    """Server-sent events for one request; however the response ends (a client that disconnects
    is cancelled by Starlette, possibly before the first chunk), an unfinished request is aborted."""

    def __init__(self, content, stream: RequestStream) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.engine_stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.engine_stream.final is None:
                _abort(self.engine_stream)


class ApiServer:
    def __init__(self, client: EngineClient, *, api_key: str | None = None, model_names: list[str] | None = None) -> None:
        if not client.info.accepts_token_ids or client.info.tokenizer is None:
            raise ValueError("the API serves a local engine (one with a tokenizer), not a remote one")
        self.client = client
        self.api_key = api_key or None
        self._names = list(model_names) if model_names else None
        self.metrics = ApiMetrics(client)
        self._token_text = TokenText(client.info.tokenizer)
        self.started = int(time.time())

    # The client's engine may be replaced while the app runs (localchat/chat/engine_switch.py): what
    # depends on the model is read from client.info per request.
    @property
    def served(self) -> list[str]:
        return self._names or [self.client.info.model_name]

    @property
    def token_text(self) -> TokenText:
        tokenizer = self.client.info.tokenizer
        if self._token_text.tokenizer is not tokenizer:
            self._token_text = TokenText(tokenizer)
        return self._token_text

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/models", self.models, methods=["GET"])
        router.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        router.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        router.add_api_route("/v1/completions", self.completions, methods=["POST"])
        router.add_api_route("/metrics", self.prometheus, methods=["GET"])
        router.add_api_route("/health", self.health, methods=["GET"])
        return router

    def close(self) -> None:
        self.metrics.close()

    # ------------------------------------------------------------------ plain routes
    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the server's key.",
                           code="invalid_api_key")

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "localchat",
                "max_model_len": self.client.info.max_model_len}

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [self._card(name) for name in self.served]})

    async def model(self, request: Request, model_id: str) -> Response:
        try:
            self._authorize(request)
            if model_id not in self.served:
                raise APIError(404, f"The model '{model_id}' does not exist here.", param="model", code="model_not_found")
        except APIError as exc:
            return error_response(exc)
        return JSONResponse(self._card(model_id))

    async def prometheus(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as exc:
            return error_response(exc)
        return Response(await run_in_threadpool(self.metrics.render), media_type=CONTENT_TYPE_LATEST)

    async def health(self) -> Response:
        reason = self.client.stopped or (None if getattr(self.client, "alive", True) else "the engine process has exited")
        if reason:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.client.info.model_name})

    # ------------------------------------------------------------------ generation
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, COMPLETION)

    async def _generate(self, request: Request, kind: str) -> Response:
        try:
            self._authorize(request)
            req = parse_request(kind, await _read_json(request), self.served)
            builder = ResponseBuilder(req, self.token_text)
            # Tokenizing a long prompt and writing to the engine's pipe may take a while: not on the event loop.
            stream = await run_in_threadpool(self._submit, req, builder.id)
        except APIError as exc:
            return error_response(exc)
        if req.stream:
            return EngineEventStream(self._events(stream, builder), stream)
        return await self._whole(request, stream, builder)

    def _submit(self, req: ApiRequest, request_id: str) -> RequestStream:
        info = self.client.info
        try:
            # A reply can grow only as far as the context and the KV pool both allow: the default
            # max_tokens fills that, and more is refused here (the engine refuses it too, requests.py).
            prepared = prepare(req, info.tokenizer, info.vocab_size, min(info.max_model_len, info.kv_capacity_tokens))
            return self.client.submit(prompt_token_ids=prepared.prompt_ids, params=prepared.params, request_id=request_id)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            raise _engine_error(exc) from None

    async def _whole(self, request: Request, stream: RequestStream, builder: ResponseBuilder) -> Response:
        next_check = time.monotonic() + DISCONNECT_CHECK_S
        try:
            async for out in stream:
                if not out.finished and time.monotonic() >= next_check:
                    next_check = time.monotonic() + DISCONNECT_CHECK_S
                    if await request.is_disconnected():
                        break
        except Exception as exc:  # noqa: BLE001
            return error_response(_engine_error(exc))
        finally:
            if stream.final is None:
                _abort(stream)
        if stream.final is None:
            return error_response(APIError(499, "The client closed the request.", code="client_closed_request"))
        return JSONResponse(builder.complete(stream.final))

    async def _events(self, stream: RequestStream, builder: ResponseBuilder):
        try:
            async for out in stream:
                for chunk in builder.chunks(out):
                    yield _sse(chunk)
                if out.finished and (last := builder.final_chunk(out)) is not None:
                    yield _sse(last)
        except Exception as exc:  # noqa: BLE001 - the status is sent already: the error goes in the stream
            yield _sse(_engine_error(exc).body())
        yield b"data: [DONE]\n\n"


async def _read_json(request: Request) -> object:
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "The request body is empty: send a JSON object.", code="invalid_json")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json") from None


def create_app(client: EngineClient, *, api_key: str | None = None, model_names: list[str] | None = None) -> FastAPI:
    """The API alone (`localchat serve`, tests); `app.state.api` is its ApiServer."""
    server = ApiServer(client, api_key=api_key, model_names=model_names)
    app = FastAPI(title="localchat API", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(server.router())
    app.state.api = server
    return app
