"""The NATS connection every service uses: connect, reconnect forever, drain on exit.

Owns connection options and connection-state logging. It does not know any subject or
message; those live in `subjects` and `protocol`.

nats-py retries the first connection too when reconnection is unlimited, so
`connect()` bounds that first wait itself (`initial_timeout_s`; None = wait forever,
as an edge agent does). Cancelling the caller cancels the wait.

Credentials come from a `specedge nats-auth` file or as `user:password@` in the URL;
URLs are logged without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """`url` without its password, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def without_login(url: str) -> str:
    """`url` without its user and password (for services that log in with their own account)."""
    parts = urllib.parse.urlsplit(url)
    netloc = f"{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def connect(url: str, name: str, initial_timeout_s: float | None = 30.0,
                  credentials: str | None = None) -> AsyncIterator[Client]:
    """Connect (retrying until `initial_timeout_s`, or forever if None), yield, then drain.

    `credentials`: a credentials file from `specedge nats-auth` (its user and password).
    """
    login = {}
    if credentials:
        from specedge.nats_auth import Credentials  # noqa: PLC0415 - bcrypt only where auth is used

        creds = Credentials.load(credentials)
        login = {"user": creds.nats_user, "password": creds.password}
    shown = redact(url)
    closing = asyncio.Event()
    refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    errors = 0

    async def on_disconnected() -> None:
        if not closing.is_set():
            log.warning("nats: disconnected from %s", shown)

    async def on_reconnected() -> None:
        log.info("nats: reconnected to %s", shown)

    async def on_error(exc: Exception) -> None:
        nonlocal errors
        errors += 1
        if "authorization violation" in str(exc).lower() and not refused.done():
            refused.set_result(None)  # wrong credentials do not get better by retrying
        if errors == 1 or errors % 20 == 0:  # a server that is down fails every retry
            log.warning("nats: %s (%d errors so far)", exc or type(exc).__name__, errors)

    connecting = asyncio.ensure_future(nats.connect(
        servers=[url],
        name=name,
        connect_timeout=2,
        allow_reconnect=True,
        max_reconnect_attempts=-1,  # reconnect forever
        reconnect_time_wait=0.5,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        error_cb=on_error,
        **login,
    ))
    try:
        await asyncio.wait({connecting, refused}, timeout=initial_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        nc = connecting.result() if connecting.done() else None
    except (OSError, nats.errors.Error) as exc:
        raise ConnectionError(f"cannot reach NATS at {shown}: {exc!r}") from None
    finally:
        if not connecting.done():
            connecting.cancel()
    if nc is None:
        if refused.done():
            raise ConnectionError(f"NATS at {shown} refused the credentials of {login.get('user') or name}")
        raise ConnectionError(f"cannot reach NATS at {shown} (waited {initial_timeout_s}s)")
    log.info("nats: connected to %s as %s", shown, name)
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
