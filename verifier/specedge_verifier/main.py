"""The verifier process: load the target model, connect, register, wait for work, drain.

Verification itself arrives with the speculative-core and distributed-system issues.
"""

from __future__ import annotations

import contextlib
import logging

from specedge import bus, registry
from specedge.engine.loading import load_for_service
from specedge.service import Lifecycle
from specedge.state import connect_redis
from specedge_verifier.settings import VerifierSettings

log = logging.getLogger("specedge_verifier")


async def serve(settings: VerifierSettings, life: Lifecycle) -> None:
    target = await load_for_service(settings.target, settings.device, settings.dtype)
    me = registry.announcement("verifier", settings.name, settings.heartbeat_s, **target.registry_details())
    async with contextlib.AsyncExitStack() as stack:
        nc = await stack.enter_async_context(bus.connect(settings.nats_url, me.instance_id))
        await stack.enter_async_context(connect_redis(settings.redis_url))
        await stack.enter_async_context(registry.presence(nc, me))
        await life.serve_until_stopped()
