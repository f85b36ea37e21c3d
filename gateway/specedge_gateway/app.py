"""The FastAPI application: built from the settings, with a lifespan that owns NATS, Redis
and presence.

Routes (`routes`): `POST /v1/chat/completions` and `POST /v1/completions` (streaming or
not), `GET /v1/models` — each behind a Bearer API key mapped to a user (`specedge keys`) —
`GET /health` (open; 503 until a verifier is registered), `GET /metrics` (open;
Prometheus, `specedge.metrics.GatewayMetrics`) and `GET /dashboard` (open unless
`--no-dashboard`; the live view, `dashboard`). Request checking and the error envelope
live in `openai_api`, the reply objects in `responses`, a generation's life in
`sessions`. While tracing is on (`specedge.telemetry`: set up first and flushed last by
the lifespan), each request is a server span of the FastAPI instrumentation — `/health`,
`/metrics` and the dashboard's own requests excluded, or whatever
`OTEL_PYTHON_FASTAPI_EXCLUDED_URLS` says.

A non-streaming reply carries the request's speculation in an extension field
`"specedge"` (`live.RequestStats`: verifications, drafted and accepted tokens).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from specedge import bus, registry, telemetry
from specedge.metrics import GatewayMetrics
from specedge.models import model_id
from specedge.service import StartupError
from specedge.state import ApiKeys, ConcurrencyLimit, SessionStore, connect_redis
from specedge_gateway.dashboard import add_dashboard
from specedge_gateway.live import LiveStats
from specedge_gateway.openai_api import (
    BodyLimit,
    OpenAIError,
    http_error_handler,
    openai_error_handler,
    validation_error_handler,
)
from specedge_gateway.routes import Gateway, api, ops
from specedge_gateway.settings import GatewaySettings
from specedge_gateway.text import TextCodec


def create_app(settings: GatewaySettings) -> FastAPI:
    served_model = model_id(settings.tokenizer)
    gw = Gateway(settings=settings, codec=TextCodec(settings.tokenizer), served_model=served_model,
                 metrics=GatewayMetrics(), live=LiveStats(),
                 me=registry.announcement("gateway", settings.name, settings.heartbeat_s,
                                          url=f"http://{settings.host}:{settings.port}", model=served_model))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(telemetry.tracing("gateway", gw.me.instance_id, redis=True))  # flushed last
            try:
                gw.nc = await stack.enter_async_context(bus.connect(
                    settings.nats_url, gw.me.instance_id, credentials=settings.credentials))
                redis = await stack.enter_async_context(connect_redis(settings.redis_url))
            except ConnectionError as exc:
                raise StartupError(str(exc)) from None
            gw.keys, gw.store = ApiKeys(redis), SessionStore(redis)  # the store fills gaps in a stream
            gw.limit = ConcurrencyLimit(redis, settings.max_concurrent_per_key)
            app.state.nc = gw.nc  # (the dashboard's timeline asks the services over it)
            await stack.enter_async_context(registry.presence(gw.nc, gw.me))
            yield

    app = FastAPI(title="SpecEdge", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gw
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(OpenAIError, openai_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mib * 2**20))
    if telemetry.exporters():  # the lifespan installs the provider the middleware's tracer then uses
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415 - only when tracing

        FastAPIInstrumentor.instrument_app(
            app, excluded_urls=os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "/health,/metrics,/dashboard"),
            exclude_spans=["receive", "send"])  # no span per SSE chunk
    app.include_router(api)
    app.include_router(ops)
    if settings.dashboard:
        add_dashboard(app, gw.live)
    return app
