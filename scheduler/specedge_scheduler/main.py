"""The scheduler process: connections, the dispatch loop, presence, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from specedge import bus, registry, telemetry
from specedge.metrics import SchedulerMetrics
from specedge.protocol import TREE_BEAMS, TREE_BRANCH
from specedge.service import Lifecycle
from specedge.state import SessionStore, connect_redis
from specedge_scheduler.guard import EdgeGuard
from specedge_scheduler.policy import SchedulingPolicy
from specedge_scheduler.service import SchedulerService
from specedge_scheduler.settings import SchedulerSettings

log = logging.getLogger("specedge_scheduler")


async def serve(settings: SchedulerSettings, life: Lifecycle) -> None:
    me = registry.announcement("scheduler", settings.name, settings.heartbeat_s)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(telemetry.tracing("scheduler", me.instance_id, redis=True))  # flushed last
        nc = await stack.enter_async_context(bus.connect(
            settings.nats_url, me.instance_id, credentials=settings.credentials,
            initial_timeout_s=settings.nats_wait_s))
        store = SessionStore(await stack.enter_async_context(connect_redis(settings.redis_url)),
                             settings.session_ttl_s)
        policy = SchedulingPolicy(settings.policy_config())
        shape = {"budget": settings.budget, "depth": settings.depth, "branch": TREE_BRANCH, "beams": TREE_BEAMS}
        metrics = SchedulerMetrics()
        metrics.serve(settings.metrics_port)
        guard = EdgeGuard(settings.guard_limits())
        service = SchedulerService(nc, me.instance_id, store, policy, shape, metrics=metrics,
                                   request_timeout_s=settings.request_timeout_s, heartbeat_s=settings.heartbeat_s,
                                   guard=guard)
        await service.subscribe()
        await service.refresh()
        await stack.enter_async_context(registry.presence(nc, me))
        dispatch = asyncio.create_task(service.run(life.stop))
        await life.serve_until_stopped()
        await dispatch
