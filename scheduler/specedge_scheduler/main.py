"""The scheduler process: connections, the dispatch loop, presence, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from specedge import bus, registry, telemetry
from specedge.metrics import SchedulerMetrics
from specedge.service import Lifecycle
from specedge.state import SessionStore, connect_redis
from specedge_scheduler.guard import EdgeGuard, GuardLimits
from specedge_scheduler.policy import SchedulingPolicy
from specedge_scheduler.service import SchedulerService
from specedge_scheduler.settings import SchedulerSettings

log = logging.getLogger("specedge_scheduler")


async def serve(settings: SchedulerSettings, life: Lifecycle) -> None:
    me = registry.announcement("scheduler", settings.name, settings.heartbeat_s)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(telemetry.tracing("scheduler", me.instance_id, redis=True))  # flushed last
        nc = await stack.enter_async_context(bus.connect(
            settings.nats_url, me.instance_id, credentials=settings.credentials))
        store = SessionStore(await stack.enter_async_context(connect_redis(settings.redis_url)),
                             settings.session_ttl_s)
        policy = SchedulingPolicy(max_batch=settings.max_batch, edge_timeout_s=settings.edge_timeout_s,
                                  verifier_timeout_s=settings.verifier_timeout_s,
                                  draft_timeout_s=settings.draft_timeout_s, strategy=settings.strategy,
                                  budget=settings.budget, depth=settings.depth,
                                  server_budget=settings.server_budget or None,
                                  server_depth=settings.server_depth or None)
        shape = {"budget": settings.budget, "depth": settings.depth, "branch": 16, "beams": 32}
        metrics = SchedulerMetrics()
        metrics.serve(settings.metrics_port)
        guard = EdgeGuard(GuardLimits(offence_limit=settings.edge_offence_limit, suspend_s=settings.edge_suspend_s))
        service = SchedulerService(nc, me.instance_id, store, policy, shape, metrics=metrics,
                                   request_timeout_s=settings.request_timeout_s, heartbeat_s=settings.heartbeat_s,
                                   guard=guard)
        await service.subscribe()
        await service.refresh()
        await stack.enter_async_context(registry.presence(nc, me))
        dispatch = asyncio.create_task(service.run(life.stop))
        await life.serve_until_stopped()
        await dispatch
