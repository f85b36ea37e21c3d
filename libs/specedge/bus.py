"""The NATS connection every service uses, and the one way messages go on and off it.

Owns connection options and connection-state logging, and trace context on the bus:
`publish`, `request` and `subscribe` here are what services call instead of the client's
own methods. The first two put the W3C trace context (`traceparent`, `tracestate`) of
the current span — or of the context given — in the message headers; `subscribe` runs
each callback with the context its message's headers carry as the current one, so a
handler's spans are children of the sender's. No span, no headers. It does not know
any subject or message; those live in `subjects` and `protocol`.

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
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context

log = logging.getLogger(__name__)


def servers(url: str) -> list[str]:
    """The servers of a NATS URL: one, or a comma-separated list (the nodes of a cluster)."""
    return [u.strip() for u in url.split(",") if u.strip()]


def redact(url: str) -> str:
    """`url` (one URL or a comma-separated list) without passwords, for logs and messages."""
    def one(u: str) -> str:
        parts = urllib.parse.urlsplit(u)
        if parts.password is None:
            return u
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    return ",".join(one(u) for u in servers(url))


def without_login(url: str) -> str:
    """`url` (one URL or a list) without user and password (for services with their own account)."""
    def one(u: str) -> str:
        parts = urllib.parse.urlsplit(u)
        netloc = f"{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    return ",".join(one(u) for u in servers(url))


@contextlib.asynccontextmanager
async def connect(url: str, name: str, initial_timeout_s: float | None = 30.0,
                  credentials: str | None = None, login: tuple[str, str] | None = None) -> AsyncIterator[Client]:
    """Connect (retrying until `initial_timeout_s`, or forever if None), yield, then drain.

    `url`: one server or a comma-separated list (a cluster's nodes): the client connects to
    one of them and, when it is lost, reconnects to a survivor. `credentials`: a
    credentials file from `specedge nats-auth` (its user and password); `login`: a user and
    password of another kind (an edge's id and its user's key, for the auth callout).
    """
    if login is not None:
        auth = {"user": login[0], "password": login[1]}
    elif credentials:
        from specedge.nats_auth import Credentials  # noqa: PLC0415 - bcrypt only where auth is used

        creds = Credentials.load(credentials)
        auth = {"user": creds.nats_user, "password": creds.password}
    elif (first := urllib.parse.urlsplit(servers(url)[0])).password is not None:
        # the login in the URL, for every node: the servers a cluster gossips carry none
        auth = {"user": urllib.parse.unquote(first.username or ""), "password": urllib.parse.unquote(first.password)}
    else:
        auth = {}
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
        servers=servers(url),
        name=name,
        connect_timeout=2,
        allow_reconnect=True,
        max_reconnect_attempts=-1,  # reconnect forever
        reconnect_time_wait=0.5,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        error_cb=on_error,
        **auth,
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
            raise ConnectionError(f"NATS at {shown} refused the credentials of {auth.get('user') or name}")
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


def trace_headers(context: Context | None = None) -> dict[str, str] | None:
    """The trace context of `context` (default: the current one) as NATS headers; None without a span."""
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context)
    return carrier or None


async def publish(nc: Client, subject: str, payload: bytes = b"", reply: str = "",
                  context: Context | None = None) -> None:
    """Publish with the trace context of `context` (default: the current one) in the headers."""
    await nc.publish(subject, payload, reply=reply, headers=trace_headers(context))


async def request(nc: Client, subject: str, payload: bytes, timeout: float,  # noqa: ASYNC109 - the client's own
                  context: Context | None = None) -> Msg:
    """Request/reply with the trace context of `context` (default: the current one) in the headers."""
    return await nc.request(subject, payload, timeout=timeout, headers=trace_headers(context))


async def subscribe(nc: Client, subject: str, cb: Callable[[Msg], Awaitable[None]] | None = None,
                    queue: str = "") -> Subscription:
    """Subscribe; each message's callback runs with the trace context from its headers as the current one."""
    if cb is None:
        return await nc.subscribe(subject, queue=queue)

    async def traced(msg: Msg) -> None:
        if not msg.headers or "traceparent" not in msg.headers:
            await cb(msg)
            return
        token = otel_context.attach(propagate.extract(msg.headers))
        try:
            await cb(msg)
        finally:
            otel_context.detach(token)

    return await nc.subscribe(subject, queue=queue, cb=traced)
