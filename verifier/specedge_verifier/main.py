"""The verifier process: load the target model, connect, serve prefill/verify/close
requests on its own subjects, register, drain on SIGTERM.

With `--tensor-parallel N` this process is rank 0 (NATS, Redis, sessions) and starts N-1
follower processes (`_follow`), each holding its slice of the target on its own device
(`cuda:<rank>`, or the CPU) and making every call rank 0's runner makes
(`engine.tensor_parallel`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import socket
from collections.abc import AsyncIterator

from specedge import bus, registry, telemetry
from specedge.engine.grammar import grammar_vocab
from specedge.engine.loading import load_causal_lm, load_for_service
from specedge.engine.parties import Verifier
from specedge.engine.shapes import plan_for
from specedge.metrics import VerifierMetrics
from specedge.service import Lifecycle, StartupError
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
            settings.nats_url, me.instance_id, credentials=settings.credentials,
            initial_timeout_s=settings.nats_wait_s))
        # with Sentinel, a commit counts once the replica holds it too: a failover loses none
        store = SessionStore(await stack.enter_async_context(connect_redis(settings.redis_url)),
                             replicas=1 if sentinel_of(settings.redis_url) else 0)
        kv_tokens = None
        if settings.kv_cache_memory is not None and settings.attention != "reference":
            kv_plan = plan_for(target.model, settings.kv_cache_memory)
            log.info("KV cache plan: %s", kv_plan.json())
            kv_tokens = kv_plan.kv_tokens
        runner_args = {"max_sessions": settings.max_sessions, "max_len": settings.max_len,
                       "attention": settings.attention, "kv_tokens": kv_tokens}
        if settings.tensor_parallel > 1:
            await stack.enter_async_context(_followers(settings, target.model, runner_args))
        vocab = None if target.tokenizer is None else await asyncio.to_thread(
            grammar_vocab, target.tokenizer, target.model.config.vocab_size)  # for structured outputs
        verifier = Verifier(target.model, tensor_parallel=settings.tensor_parallel > 1, grammar_vocab=vocab,
                            **runner_args)
        if settings.tensor_parallel > 1:
            stack.callback(verifier.stop_followers)
        await asyncio.to_thread(verifier.runner.warm_up)  # compile before taking traffic
        metrics = VerifierMetrics()
        metrics.serve(settings.metrics_port)
        await VerifierService(nc, me.instance_id, verifier, store, metrics).subscribe()
        await stack.enter_async_context(registry.presence(
            nc, me, live=lambda: {"free_tokens": str(verifier.free_tokens)}))
        await life.serve_until_stopped()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def _followers(settings: VerifierSettings, model, runner_args: dict) -> AsyncIterator[None]:
    """Start ranks 1…N-1 and join the group as rank 0; wait for them when the block ends."""
    from specedge.engine import tensor_parallel as tp  # noqa: PLC0415

    world, address = settings.tensor_parallel, f"tcp://127.0.0.1:{_free_port()}"
    device = str(next(model.parameters()).device)
    context = multiprocessing.get_context("spawn")
    on_gpu = device.startswith("cuda")
    procs = [context.Process(target=_follow, args=(settings, f"cuda:{rank}" if on_gpu else "cpu", rank, world,
                                                   address, runner_args), daemon=True)
             for rank in range(1, world)]
    for proc in procs:
        proc.start()
    try:
        await asyncio.wait_for(asyncio.to_thread(tp.init, 0, world, address, device), timeout=600)
    except TimeoutError:
        raise StartupError(f"the {world - 1} tensor-parallel follower(s) did not join within 600s") from None
    log.info("tensor parallel over %d ranks (%s)", world, address)
    try:
        yield
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()


def _follow(settings: VerifierSettings, device: str, rank: int, world: int, address: str, runner_args: dict) -> None:
    """A follower rank: its device, the same target, sharded; rank 0's calls until it stops."""
    from specedge.engine import tensor_parallel as tp  # noqa: PLC0415
    from specedge.engine.parties import follow_verifier  # noqa: PLC0415

    target = load_causal_lm(settings.target, device, settings.dtype)
    tp.init(rank, world, address, device)
    follow_verifier(target.model, **runner_args)
