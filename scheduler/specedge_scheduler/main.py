"""The scheduler process: connections, presence, shutdown.

For now it connects to NATS and Redis, registers and waits; the admission and batching
loops arrive with the distributed-system issue.
"""

from __future__ import annotations

import contextlib
import logging

from specedge import bus, registry
from specedge.config import RedisServiceSettings
from specedge.service import Lifecycle
from specedge.state import connect_redis

log = logging.getLogger("specedge_scheduler")


async def serve(settings: RedisServiceSettings, life: Lifecycle) -> None:
    me = registry.announcement("scheduler", settings.name, settings.heartbeat_s)
    async with contextlib.AsyncExitStack() as stack:
        nc = await stack.enter_async_context(bus.connect(settings.nats_url, me.instance_id))
        await stack.enter_async_context(connect_redis(settings.redis_url))
        await stack.enter_async_context(registry.presence(nc, me))
        await life.serve_until_stopped()
