"""The edge-agent process: load the draft model, connect out to NATS, register, drain.

Reconnects forever, including the first connection: an edge may start before the server
side is reachable, and Ctrl-C still stops it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from edge_agent.settings import EdgeAgentSettings
from specedge import bus, registry
from specedge.engine.loading import ModelLoadError, load_causal_lm
from specedge.models import model_id
from specedge.service import Lifecycle, StartupError

log = logging.getLogger("edge_agent")


async def serve(settings: EdgeAgentSettings, life: Lifecycle) -> None:
    try:
        draft = await asyncio.to_thread(load_causal_lm, settings.draft, settings.device, settings.dtype)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    me = registry.announcement(
        "edge-agent", settings.name, settings.heartbeat_s,
        model=model_id(settings.draft), tokenizer_fingerprint=draft.tokenizer_fingerprint,
        device=str(draft.device), max_sessions=str(settings.max_sessions),
    )
    async with contextlib.AsyncExitStack() as stack:
        # An edge may start before the server side is reachable: wait for NATS forever.
        nc = await stack.enter_async_context(bus.connect(settings.nats_url, me.instance_id, initial_timeout_s=None))
        await stack.enter_async_context(registry.presence(nc, me))
        await life.serve_until_stopped()
