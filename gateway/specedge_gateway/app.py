"""The FastAPI application: routes and the lifespan that owns NATS, Redis and presence.

The OpenAI endpoints arrive with the distributed-system issue; for now the gateway
answers `/health` (503 until a verifier is registered) and `/v1/models`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from specedge import bus, registry
from specedge.service import StartupError
from specedge.state import connect_redis
from specedge_gateway.openai_api import OpenAIError, openai_error_handler, validation_error_handler
from specedge_gateway.settings import GatewaySettings

log = logging.getLogger("specedge_gateway")


def create_app(settings: GatewaySettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        me = registry.announcement("gateway", settings.name, settings.heartbeat_s,
                                   url=f"http://{settings.host}:{settings.port}")
        async with contextlib.AsyncExitStack() as stack:
            try:
                app.state.nc = await stack.enter_async_context(bus.connect(settings.nats_url, me.instance_id))
                app.state.redis = await stack.enter_async_context(connect_redis(settings.redis_url))
            except ConnectionError as exc:
                raise StartupError(str(exc)) from None
            await stack.enter_async_context(registry.presence(app.state.nc, me))
            yield

    app = FastAPI(title="SpecEdge", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(OpenAIError, openai_error_handler)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        found = await registry.discover(request.app.state.nc, wait_s=0.2)
        verifiers = sum(1 for a in found if a.role == "verifier")
        status = 200 if verifiers else 503
        return JSONResponse({"status": "ok" if verifiers else "no verifier", "verifiers": verifiers},
                            status_code=status)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        found = await registry.discover(request.app.state.nc, wait_s=0.2)
        names = sorted({a.details.get("model", "") for a in found if a.role == "verifier"} - {""})
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "specedge"} for n in names]}

    return app
