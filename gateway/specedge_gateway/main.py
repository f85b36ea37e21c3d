"""The gateway process: uvicorn serving the app; uvicorn owns signals and graceful shutdown."""

from __future__ import annotations

import uvicorn

from specedge.service import setup_logging
from specedge_gateway.app import create_app
from specedge_gateway.settings import GatewaySettings


def main(settings: GatewaySettings) -> None:
    setup_logging(settings.log_level)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=settings.log_level, log_config=None, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(2)
