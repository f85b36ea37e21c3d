"""The FastAPI application: routes and the lifespan that owns NATS, Redis and presence.

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (streaming or not),
`GET /v1/models` — each behind a Bearer API key mapped to a user (`specedge keys`) —
`GET /health` (open; 503 until a verifier is registered), `GET /metrics` (open;
Prometheus, `specedge.metrics.GatewayMetrics`) and `GET /dashboard` (open unless
`--no-dashboard`; the live view, `dashboard`). Request checking and the error envelope
live in `openai_api`, a generation's life in `sessions`. While tracing is on
(`specedge.telemetry`: set up first and flushed last by the lifespan), each request is a
server span of the FastAPI instrumentation — `/health`, `/metrics` and the dashboard's
own requests excluded, or whatever `OTEL_PYTHON_FASTAPI_EXCLUDED_URLS` says.

A non-streaming reply carries the request's speculation in an extension field
`"specedge"` (`live.RequestStats`: verifications, drafted and accepted tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from specedge import bus, registry, telemetry
from specedge.metrics import GatewayMetrics
from specedge.models import model_id
from specedge.service import StartupError
from specedge.state import ApiKeys, ConcurrencyLimit, SessionStore, connect_redis
from specedge_gateway.dashboard import add_dashboard
from specedge_gateway.live import LiveStats, RequestStats
from specedge_gateway.openai_api import (
    MAX_CHARS_PER_TOKEN,
    BodyLimit,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationSpec,
    OpenAIError,
    http_error_handler,
    openai_error_handler,
    to_generation,
    usage,
    validation_error_handler,
)
from specedge_gateway.sessions import generate
from specedge_gateway.settings import GatewaySettings
from specedge_gateway.text import TextCodec

log = logging.getLogger("specedge_gateway")


def create_app(settings: GatewaySettings) -> FastAPI:
    codec = TextCodec(settings.tokenizer)
    served_model = model_id(settings.tokenizer)
    metrics = GatewayMetrics()
    me = registry.announcement("gateway", settings.name, settings.heartbeat_s,
                               url=f"http://{settings.host}:{settings.port}", model=served_model)
    live = LiveStats()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(telemetry.tracing("gateway", me.instance_id, redis=True))  # flushed last
            try:
                app.state.nc = await stack.enter_async_context(bus.connect(
                    settings.nats_url, me.instance_id, credentials=settings.credentials))
                app.state.redis = await stack.enter_async_context(connect_redis(settings.redis_url))
            except ConnectionError as exc:
                raise StartupError(str(exc)) from None
            app.state.keys = ApiKeys(app.state.redis)
            app.state.limit = ConcurrencyLimit(app.state.redis, settings.max_concurrent_per_key)
            app.state.store = SessionStore(app.state.redis)  # committed tokens, to fill a gap in a stream
            await stack.enter_async_context(registry.presence(app.state.nc, me))
            yield

    app = FastAPI(title="SpecEdge", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(OpenAIError, openai_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mib * 2**20))
    if telemetry.exporters():  # the lifespan installs the provider the middleware's tracer then uses
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415 - only when tracing

        FastAPIInstrumentor.instrument_app(
            app, excluded_urls=os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "/health,/metrics,/dashboard"),
            exclude_spans=["receive", "send"])  # no span per SSE chunk
    bearer = HTTPBearer(auto_error=False, description="An API key from `specedge keys create`.")

    # (Dependencies as defaults: the annotations are strings here and these are local names.)
    async def user_of(request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        """The caller's user name, from their API key ("" when keys are not required)."""
        if not settings.require_api_key:
            return ""
        if credentials is None:
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        try:
            user = await request.app.state.keys.user_of(credentials.credentials)
        except Exception as exc:
            log.warning("cannot check an API key: %r", exc)
            raise OpenAIError(503, "cannot check the API key right now", "server_error", code="unavailable") from None
        if user is None:
            raise OpenAIError(401, "incorrect API key provided", code="invalid_api_key")
        return user

    caller = Depends(user_of)

    def prepare(spec: GenerationSpec) -> tuple[list[int], int]:
        if spec.model != served_model:
            raise OpenAIError(404, f"model {spec.model!r} does not exist; this server serves {served_model!r}",
                              "not_found_error", "model", "model_not_found")
        chars = sum(len(m["content"]) for m in spec.messages) if spec.messages is not None else len(spec.prompt)
        if chars > settings.max_context * MAX_CHARS_PER_TOKEN:  # cannot fit: refused before any work on it
            raise OpenAIError(400, f"the prompt has {chars} characters; the context holds {settings.max_context} "
                              "tokens", param="messages" if spec.messages is not None else "prompt",
                              code="context_length_exceeded")
        try:
            prompt = codec.chat_prompt(spec.messages) if spec.messages is not None else spec.prompt
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="messages", code="invalid_messages") from None
        ids = codec.encode(prompt)
        room = settings.max_context - len(ids)
        if not ids or room < 1:
            raise OpenAIError(400, f"the prompt is {len(ids)} tokens; the context holds {settings.max_context}",
                              param="messages" if spec.messages is not None else "prompt",
                              code="context_length_exceeded")
        wanted = spec.max_tokens or min(settings.default_max_tokens, room)
        if wanted > room:
            raise OpenAIError(400, f"max_tokens {wanted} exceeds the {room} tokens left in the context",
                              param="max_tokens", code="context_length_exceeded")
        return ids, wanted

    async def respond(request: Request, spec: GenerationSpec, chat: bool, user: str):
        ids, max_new = await asyncio.to_thread(prepare, spec)  # templating and tokenizing: off the event loop
        limit = request.app.state.limit
        if user and not await limit.acquire(user):
            raise OpenAIError(429, f"too many concurrent requests for this API key (at most "
                              f"{settings.max_concurrent_per_key}); retry when one finishes", "rate_limit_error",
                              code="rate_limit_exceeded")
        release = functools.partial(limit.release, user) if user else None
        stats = RequestStats(mode=spec.mode, seed=spec.seed)
        pieces = generate(request.app.state.nc, codec, spec, ids, max_new, user, metrics=metrics, on_close=release,
                          live=live, stats=stats, store=request.app.state.store)
        name = "chatcmpl" if chat else "cmpl"
        ident, created = f"{name}-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": served_model}
        if not spec.stream:
            text, last = [], None
            async for piece in pieces:
                text.append(piece.text)
                last = piece
            content = "".join(text)
            head["system_fingerprint"] = stats.system_fingerprint
            choice = ({"index": 0, "message": {"role": "assistant", "content": content},
                       "finish_reason": last.finish_reason} if chat else
                      {"index": 0, "text": content, "finish_reason": last.finish_reason, "logprobs": None})
            return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                    "usage": usage(len(ids), last.completion_tokens), "specedge": stats.as_dict()}
        first = await anext(pieces)  # errors before the first token are still plain HTTP errors
        head["system_fingerprint"] = stats.system_fingerprint
        return StreamingResponse(stream(first, pieces, head, chat, len(ids), spec.include_usage),
                                 media_type="text/event-stream")

    async def stream(first, pieces, head, chat, prompt_tokens, include_usage) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {**head, "object": kind, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        if chat:
            yield chunk(None, None, role=True)
        last = first
        try:
            piece = first
            while True:
                if piece.text:
                    yield chunk(piece.text, None)
                last = piece
                if piece.finish_reason is not None:
                    break
                piece = await anext(pieces)
        except OpenAIError as exc:
            error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        finally:
            await pieces.aclose()  # a client that went away closes its session
        yield chunk(None, last.finish_reason)
        if include_usage:
            totals = usage(prompt_tokens, last.completion_tokens)
            yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': totals})}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, user: str = caller):
        return await respond(request, to_generation(body), chat=True, user=user)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, user: str = caller):
        return await respond(request, to_generation(body), chat=False, user=user)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if settings.dashboard:
        add_dashboard(app, live)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        found = await registry.discover(request.app.state.nc, wait_s=0.2)
        verifiers = sum(1 for a in found if a.role == "verifier")
        status = 200 if verifiers else 503
        return JSONResponse({"status": "ok" if verifiers else "no verifier", "verifiers": verifiers},
                            status_code=status)

    @app.get("/v1/models")
    async def models(request: Request, user: str = caller) -> dict:
        found = await registry.discover(request.app.state.nc, wait_s=0.2)
        names = sorted({a.details.get("model", "") for a in found if a.role == "verifier"} - {""})
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "specedge"} for n in names]}

    return app
