"""The verifier process: load the target model, connect, serve prefill/verify/close
requests on its own subjects, register, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from specedge import bus, registry, telemetry
from specedge.engine.loading import load_for_service
from specedge.engine.parties import Verifier
from specedge.engine.shapes import plan_for
from specedge.metrics import VerifierMetrics
from specedge.service import Lifecycle
from specedge.state import SessionStore, connect_redis, sentinel_of
from specedge_verifier.handlers import VerifierService
from specedge_verifier.settings import VerifierSettings

log = logging.getLogger("specedge_verifier")


async def serve(settings: VerifierSettings, life: Lifecycle) -> None:
    target = await load_for_service(settings.target, settings.device, settings.dtype)
    details = target.registry_details()
    # what a response's system_fingerprint reports: the attention backend (exact or not) and the dtype
    me = registry.announcement("verifier", settings.name, settings.heartbeat_s,
                               max_sessions=str(settings.max_sessions), max_len=str(settings.max_len),
                               engine=f"{settings.attention}-{details['dtype']}", **details)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(telemetry.tracing("verifier", me.instance_id, redis=True))  # flushed last
        nc = await stack.enter_async_context(bus.connect(
            settings.nats_url, me.instance_id, credentials=settings.credentials))
        # with Sentinel, a commit counts once the replica holds it too: a failover loses none
        store = SessionStore(await stack.enter_async_context(connect_redis(settings.redis_url)),
                             replicas=1 if sentinel_of(settings.redis_url) else 0)
        kv_tokens = None
        if settings.kv_cache_memory is not None and settings.attention != "reference":
            kv_plan = plan_for(target.model, settings.kv_cache_memory)
            log.info("KV cache plan: %s", kv_plan.json())
            kv_tokens = kv_plan.kv_tokens
        verifier = Verifier(target.model, max_sessions=settings.max_sessions, max_len=settings.max_len,
                            attention=settings.attention, kv_tokens=kv_tokens)
        await asyncio.to_thread(verifier.runner.warm_up)  # compile before taking traffic
        metrics = VerifierMetrics()
        metrics.serve(settings.metrics_port)
        await VerifierService(nc, me.instance_id, verifier, store, metrics).subscribe()
        await stack.enter_async_context(registry.presence(
            nc, me, live=lambda: {"free_tokens": str(verifier.free_tokens)}))
        await life.serve_until_stopped()
