"""The edge-agent process: load the draft model, connect out to NATS, register, drain.

Reconnects forever, including the first connection: an edge may start before the server
side is reachable, and Ctrl-C still stops it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from edge_agent.handlers import EdgeService
from edge_agent.settings import EdgeAgentSettings
from specedge import bus, registry, telemetry
from specedge.engine.loading import load_for_service
from specedge.engine.parties import Drafter
from specedge.engine.tree import TreeParams
from specedge.service import Lifecycle, StartupError

log = logging.getLogger("edge_agent")


async def serve(settings: EdgeAgentSettings, life: Lifecycle) -> None:
    edge_id = _edge_id(settings)
    draft = await load_for_service(settings.draft, settings.device, settings.dtype)
    me = registry.announcement("edge-agent", settings.name, settings.heartbeat_s, instance_id=edge_id,
                               max_sessions=str(settings.max_sessions), user=settings.user, pool=settings.pool,
                               **draft.registry_details())
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(telemetry.tracing("edge-agent", me.instance_id))  # flushed last
        # An edge may start before the server side is reachable: wait for NATS forever.
        nc = await stack.enter_async_context(bus.connect(
            settings.nats_url, me.instance_id, initial_timeout_s=None, credentials=settings.credentials))
        drafter = Drafter(draft.model, TreeParams(), max_sessions=settings.max_sessions, max_len=settings.max_len,
                          max_ahead=settings.trees_ahead, attention=settings.attention)
        await asyncio.to_thread(drafter.runner.warm_up)  # compile before taking sessions
        service = EdgeService(nc, me.instance_id, drafter, stop=life.stop, proactive=settings.drafts_ahead,
                              send_ahead=settings.send_ahead)
        await service.subscribe()
        await stack.enter_async_context(registry.presence(nc, me))
        await life.serve_until_stopped()
    if service.refused is not None:
        raise StartupError(f"refused by the server side ({service.refused.reason}): {service.refused.message}")


def _edge_id(settings: EdgeAgentSettings) -> str | None:
    """The edge id its NATS account is bound to (None without an account: a generated one)."""
    if not settings.credentials:
        return None
    from specedge.nats_auth import Credentials  # noqa: PLC0415

    try:
        identity = Credentials.load(settings.credentials).identity
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if identity.role != "edge-agent" or (identity.pool, identity.user) != (settings.pool, settings.user):
        raise StartupError(f"the credentials are for {identity.role} {identity.edge_id or identity.nats_user} "
                           f"(pool {identity.pool or '-'}, user {identity.user or '-'}), not for an edge "
                           f"of pool {settings.pool}, user {settings.user or '-'}")
    return identity.edge_id
