"""The verifier process: load the target model, connect, register, wait for work, drain.

Verification itself arrives with the speculative-core and distributed-system issues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from specedge import bus, registry
from specedge.engine.loading import ModelLoadError, load_causal_lm
from specedge.models import model_id
from specedge.service import Lifecycle, StartupError
from specedge.state import connect_redis
from specedge_verifier.settings import VerifierSettings

log = logging.getLogger("specedge_verifier")


async def serve(settings: VerifierSettings, life: Lifecycle) -> None:
    try:
        target = await asyncio.to_thread(load_causal_lm, settings.target, settings.device, settings.dtype)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    me = registry.announcement(
        "verifier", settings.name, settings.heartbeat_s,
        model=model_id(settings.target), tokenizer_fingerprint=target.tokenizer_fingerprint,
        device=str(target.device), dtype=str(target.dtype).removeprefix("torch."),
    )
    async with contextlib.AsyncExitStack() as stack:
        nc = await stack.enter_async_context(bus.connect(settings.nats_url, me.instance_id))
        await stack.enter_async_context(connect_redis(settings.redis_url))
        await stack.enter_async_context(registry.presence(nc, me))
        await life.serve_until_stopped()
