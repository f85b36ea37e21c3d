"""Service presence on the bus: announce, heartbeat, answer discovery, leave.

A service enters `presence()` once it is ready to work; from then on it is visible to
`discover()` (used by `specedge up`, `specedge status` and, later, the scheduler). A
heartbeat re-announces it every `heartbeat_s`; on exit it publishes a leave message.
Malformed discovery traffic is logged and ignored, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from specedge import __version__, bus, subjects
from specedge.protocol import ProtocolError, Reason, Role, ServiceAnnouncement, ServiceLeave, decode, encode

log = logging.getLogger(__name__)


def new_instance_id(role: str) -> str:
    """Unique per process: role, host and a random suffix (subject-token safe)."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:24]
    return f"{role}-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def announcement(
    role: Role, name: str | None = None, heartbeat_s: float = 2.0, instance_id: str | None = None, **details: str
) -> ServiceAnnouncement:
    """This process's announcement; `instance_id` is fixed where credentials name it (an edge's id)."""
    instance_id = instance_id or new_instance_id(role)
    return ServiceAnnouncement(
        role=role,
        instance_id=instance_id,
        name=name or instance_id,
        version=__version__,
        heartbeat_s=heartbeat_s,
        details={k: str(v) for k, v in details.items()},
    )


def announce_subject(ann: ServiceAnnouncement) -> str:
    """The one subject `ann` may be announced on (an edge's names its pool and owner)."""
    return subjects.registry_announce(ann.role, ann.instance_id, ann.details.get("pool", ""),
                                      ann.details.get("user", ""))


@contextlib.asynccontextmanager
async def presence(nc: Client, me: ServiceAnnouncement,
                   live: Callable[[], dict[str, str]] | None = None) -> AsyncIterator[ServiceAnnouncement]:
    """Be visible on the bus for the duration of the block; `live` adds details read anew
    for every announcement (a verifier's free KV capacity)."""

    def payload() -> bytes:
        if live is None:
            return encoded
        return encode(msgspec.structs.replace(me, details={**me.details, **live()}))

    encoded = encode(me)

    async def on_discover(msg: Msg) -> None:
        # answered on our own announcement subject — the one our credentials may publish —
        # not to the asker's inbox, where anyone could claim any role
        await bus.publish(nc, announce_subject(me), payload())

    sub = await bus.subscribe(nc, subjects.REGISTRY_DISCOVER, cb=on_discover)
    await nc.flush()  # the subscription is live on the server before we say we are registered

    async def heartbeat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a heartbeat lost while reconnecting is fine
                await bus.publish(nc, announce_subject(me), payload())
            await asyncio.sleep(me.heartbeat_s)

    task = asyncio.create_task(heartbeat(), name=f"heartbeat-{me.instance_id}")
    log.info("registered %s as %s (%s)", me.role, me.name, me.instance_id)
    try:
        yield me
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
            await bus.publish(
                nc, subjects.registry_leave(me.role, me.instance_id),
                encode(ServiceLeave(role=me.role, instance_id=me.instance_id)),
            )
            await nc.flush(timeout=2)
        log.info("left the registry: %s", me.instance_id)


async def discover(nc: Client, wait_s: float = 0.5) -> list[ServiceAnnouncement]:
    """Ask every live service to announce itself now; collect for `wait_s` seconds the
    announcements heard on their own subjects. An announcement on a subject that is not
    its own (another role's, another instance's) is ignored: NATS permissions bind the
    subject to the publisher's account, so an edge cannot pass for a verifier."""
    found: dict[str, ServiceAnnouncement] = {}

    async def on_announcement(msg: Msg) -> None:
        try:
            ann = decode(msg.data, ServiceAnnouncement)
            if msg.subject != announce_subject(ann):
                raise ProtocolError(Reason.IDENTITY_MISMATCH, "announced on another service's subject")
        except ValueError as exc:  # ProtocolError included
            log.warning("ignoring an announcement on %s (%s)", msg.subject, getattr(exc, "reason", exc))
            return
        found[ann.instance_id] = ann

    sub = await bus.subscribe(nc, subjects.REGISTRY_ANNOUNCE_ALL, cb=on_announcement)
    try:
        await nc.flush()  # listening before anyone is asked
        await bus.publish(nc, subjects.REGISTRY_DISCOVER, b"")
        await nc.flush()
        await asyncio.sleep(wait_s)
    finally:
        await sub.unsubscribe()
    return sorted(found.values(), key=lambda a: (a.role, a.instance_id))
