"""The NATS connection every service uses: connect, reconnect forever, drain on exit.

Owns connection options and connection-state logging. It does not know any subject or
message; those live in `subjects` and `protocol`.

nats-py retries the first connection too when reconnection is unlimited, so
`connect()` bounds that first wait itself (`initial_timeout_s`; None = wait forever,
as an edge agent does). Cancelling the caller cancels the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def connect(url: str, name: str, initial_timeout_s: float | None = 30.0) -> AsyncIterator[Client]:
    """Connect (retrying until `initial_timeout_s`, or forever if None), yield, then drain."""
    closing = asyncio.Event()
    errors = 0

    async def on_disconnected() -> None:
        if not closing.is_set():
            log.warning("nats: disconnected from %s", url)

    async def on_reconnected() -> None:
        log.info("nats: reconnected to %s", url)

    async def on_error(exc: Exception) -> None:
        nonlocal errors
        errors += 1
        if errors == 1 or errors % 20 == 0:  # a server that is down fails every retry
            log.warning("nats: %s (%d errors so far)", exc or type(exc).__name__, errors)

    try:
        nc = await asyncio.wait_for(nats.connect(
            servers=[url],
            name=name,
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # reconnect forever
            reconnect_time_wait=0.5,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            error_cb=on_error,
        ), timeout=initial_timeout_s)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ConnectionError(f"cannot reach NATS at {url} (waited {initial_timeout_s}s): {exc!r}") from None
    log.info("nats: connected to %s as %s", url, name)
    try:
        yield nc
    finally:
        closing.set()
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), timeout=5)
        if not nc.is_closed:
            with contextlib.suppress(Exception):  # the server may be gone: closing must not fail the exit
                await nc.close()
