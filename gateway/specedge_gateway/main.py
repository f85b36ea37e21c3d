"""The gateway process: uvicorn serving the app; uvicorn owns signals and graceful shutdown."""

from __future__ import annotations

import signal

import uvicorn

from specedge.service import setup_logging
from specedge_gateway.app import create_app
from specedge_gateway.settings import GatewaySettings


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(settings: GatewaySettings) -> None:
    setup_logging(settings.log_level)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the
    # handler that was installed before it: make that a clean exit, not death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=settings.log_level, log_config=None, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(2)
