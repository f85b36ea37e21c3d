"""The gateway process: uvicorn serving the app; uvicorn owns signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from specedge import bus, registry
from specedge.protocol import MAX_GRAMMAR_CHARS, MAX_SESSION_MESSAGE_BYTES, ServiceAnnouncement
from specedge.service import StartupError, exit_now, setup_logging
from specedge_gateway.app import create_app
from specedge_gateway.settings import GatewaySettings

log = logging.getLogger("specedge_gateway")
BYTES_PER_TOKEN = 5  # a token id in MessagePack, at most
MESSAGE_OVERHEAD = 4096 + MAX_GRAMMAR_CHARS  # a session message's other fields, a structured output's grammar


async def preflight(settings: GatewaySettings) -> None:
    """Before serving: the bus is reachable, a prompt of --max-context tokens fits in one of
    its messages (the session opening carries the whole prompt), and — when verifiers are
    already up — at least one of them holds sessions that long. Verifiers that start later
    answer a longer prompt with `prompt_too_long` (400), evicting nobody."""
    try:
        async with bus.connect(settings.nats_url, "gateway-preflight", credentials=settings.credentials,
                               initial_timeout_s=settings.nats_wait_s) as nc:
            max_payload = nc.max_payload
            verifiers = [a for a in await registry.discover(nc, wait_s=0.3) if a.role == "verifier"]
    except ConnectionError as exc:
        raise StartupError(str(exc)) from None
    if (needed := settings.max_context * BYTES_PER_TOKEN + MESSAGE_OVERHEAD) > min(max_payload,
                                                                                 MAX_SESSION_MESSAGE_BYTES):
        raise StartupError(f"--max-context {settings.max_context} needs bus messages of up to {needed} bytes; the "
                           f"NATS server allows {max_payload} (max_payload), SpecEdge {MAX_SESSION_MESSAGE_BYTES}: "
                           "lower --max-context (or raise max_payload)")
    if problem := context_problem(settings.max_context, verifiers):
        raise StartupError(problem)


def context_problem(max_context: int, verifiers: list[ServiceAnnouncement]) -> str | None:
    """Why no registered verifier can hold a --max-context session, or None (also when none is up yet)."""
    lengths = {a.instance_id: int(a.details["max_len"]) for a in verifiers if a.details.get("max_len", "").isdigit()}
    if not lengths or max(lengths.values()) >= max_context:
        return None
    longest = max(lengths.values())
    return (f"--max-context {max_context} is more than any verifier holds per session ({len(lengths)} up, the "
            f"longest --max-len is {longest}): lower --max-context or start the verifiers with a larger --max-len")


def _exit_cleanly(signum: int, frame: object) -> None:
    exit_now(0)  # uvicorn raises the signal again once its shutdown is done


def main(settings: GatewaySettings) -> None:
    setup_logging(settings.log_level)
    try:
        asyncio.run(preflight(settings))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
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
