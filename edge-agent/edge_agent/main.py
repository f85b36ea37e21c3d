"""The edge-agent process: load the draft model, connect out to NATS, register, drain.

Reconnects forever, including the first connection: an edge may start before the server
side is reachable, and Ctrl-C still stops it at once. With `--api-key` it joins through
the deployment's auth callout as `key-<random>` and asks it whom it drafts for
(`EdgeIdentity`) before it announces itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from edge_agent.handlers import EdgeService
from edge_agent.settings import EdgeAgentSettings
from specedge import bus, protocol, registry, subjects, telemetry
from specedge.engine.grammar import grammar_vocab
from specedge.engine.loading import load_for_service
from specedge.engine.parties import Drafter
from specedge.engine.tree import TreeParams
from specedge.nats_auth import KEY_EDGE_PREFIX
from specedge.protocol import EdgeIdentity, ProtocolError
from specedge.service import Lifecycle, StartupError

log = logging.getLogger("edge_agent")


async def serve(settings: EdgeAgentSettings, life: Lifecycle) -> None:
    edge_id = _edge_id(settings) or (KEY_EDGE_PREFIX + uuid.uuid4().hex[:16] if settings.api_key
                                     else registry.new_instance_id("edge-agent"))
    draft = await load_for_service(settings.draft, settings.device, settings.dtype)
    async with contextlib.AsyncExitStack() as stack:
        # An edge may start before the server side is reachable: wait for NATS forever.
        nc = await stack.enter_async_context(bus.connect(
            settings.nats_url, edge_id, initial_timeout_s=None, credentials=settings.credentials,
            login=(edge_id, settings.api_key) if settings.api_key else None))
        user, pool = settings.user, settings.pool
        if settings.api_key:
            identity = await _whoami(nc, edge_id)
            if settings.user and settings.user != identity.user:
                raise StartupError(f"the key is {identity.user or 'the shared pool'}'s, not {settings.user}'s")
            user, pool = identity.user, identity.pool
        me = registry.announcement("edge-agent", settings.name, settings.heartbeat_s, instance_id=edge_id,
                                   max_sessions=str(settings.max_sessions), user=user, pool=pool,
                                   **draft.registry_details())
        stack.enter_context(telemetry.tracing("edge-agent", me.instance_id))  # flushed last
        vocab = None if draft.tokenizer is None else await asyncio.to_thread(
            grammar_vocab, draft.tokenizer, draft.model.config.vocab_size)  # to draft structured outputs
        drafter = Drafter(draft.model, TreeParams(), max_sessions=settings.max_sessions, max_len=settings.max_len,
                          max_ahead=settings.trees_ahead, attention=settings.attention, grammar_vocab=vocab)
        await asyncio.to_thread(drafter.runner.warm_up)  # compile before taking sessions
        service = EdgeService(nc, me.instance_id, drafter, stop=life.stop, proactive=settings.drafts_ahead,
                              send_ahead=settings.send_ahead)
        await service.subscribe()
        await stack.enter_async_context(registry.presence(nc, me))
        await life.serve_until_stopped()
    if service.refused is not None:
        raise StartupError(f"refused by the server side ({service.refused.reason}): {service.refused.message}")


async def _whoami(nc, edge_id: str) -> EdgeIdentity:
    """Ask the auth callout whom this key-joined edge drafts for (asked again until it answers)."""
    answer: asyncio.Future[EdgeIdentity] = asyncio.get_running_loop().create_future()

    async def on_identity(msg) -> None:
        if not answer.done():
            with contextlib.suppress(ProtocolError):
                answer.set_result(protocol.decode(msg.data, EdgeIdentity))

    sub = await bus.subscribe(nc, subjects.edge_identity(edge_id), cb=on_identity)
    try:
        for attempt in range(30):
            await bus.publish(nc, subjects.auth_whoami(edge_id), b"")
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(answer), timeout=min(5.0, 0.5 * 2 ** attempt))
        raise StartupError("joined NATS, but the auth callout does not say whom this edge drafts for")
    finally:
        await sub.unsubscribe()


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
