"""`specedge verifier`: command-line entry point (light; torch is imported by the service)."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from specedge.config import (
    Attention,
    Credentials,
    Device,
    Dtype,
    Exact,
    LogLevelOpt,
    MetricsPort,
    Name,
    NatsUrl,
    NatsWait,
    RedisUrl,
    attention_backend,
    build,
    default,
)
from specedge.models import BUNDLED_TARGET, bundled
from specedge_verifier.settings import VerifierSettings


def command(
    nats_url: NatsUrl = default(VerifierSettings, "nats_url"),
    credentials: Credentials = default(VerifierSettings, "credentials"),
    nats_wait: NatsWait = default(VerifierSettings, "nats_wait_s"),
    redis_url: RedisUrl = default(VerifierSettings, "redis_url"),
    target: Annotated[str | None, typer.Option(
        "--target", envvar="SPECEDGE_TARGET",
        help="Target model: a local path or a hub id (default: the bundled tiny target).")] = None,
    device: Device = default(VerifierSettings, "device"),
    dtype: Dtype = default(VerifierSettings, "dtype"),
    max_sessions: Annotated[int, typer.Option(
        "--max-sessions", envvar="SPECEDGE_MAX_SESSIONS", help="KV cache slots (sessions held at once).")]
    = default(VerifierSettings, "max_sessions"),
    max_len: Annotated[int, typer.Option(
        "--max-len", envvar="SPECEDGE_MAX_LEN", help="Most tokens (prompt + output) per session.")]
    = default(VerifierSettings, "max_len"),
    attention: Attention = default(VerifierSettings, "attention"),
    exact: Exact = None,
    kv_cache_memory: Annotated[float | None, typer.Option(
        "--kv-cache-memory", envvar="SPECEDGE_KV_CACHE_MEMORY",
        help="KV pool size: GiB above 1, else the fraction of device memory the verifier may use in all "
             "(default: room for --max-sessions sessions of --max-len).")]
    = default(VerifierSettings, "kv_cache_memory"),
    plan: Annotated[bool, typer.Option(
        "--plan", envvar="SPECEDGE_PLAN",
        help="Print the memory plan as one JSON line and exit without allocating.")] = False,
    memory_gib: Annotated[float | None, typer.Option(
        "--memory-gib", envvar="SPECEDGE_MEMORY_GIB",
        help="With --plan: the device memory to plan for (default: this device's).")] = None,
    tensor_parallel: Annotated[int, typer.Option(
        "--tensor-parallel", envvar="SPECEDGE_TENSOR_PARALLEL", min=1,
        help="Spread the target over this many ranks (GPUs of this machine, cuda:0…; on CPU, processes) with "
             "torch.distributed; verifies bit for bit as one (exact engine).")]
    = default(VerifierSettings, "tensor_parallel"),
    metrics_port: MetricsPort = default(VerifierSettings, "metrics_port"),
    name: Name = default(VerifierSettings, "name"),
    log_level: LogLevelOpt = default(VerifierSettings, "log_level"),
) -> None:
    """Run a verifier: holds the target model and verifies batches of draft trees."""
    if plan:
        from specedge.engine.shapes import print_plan  # noqa: PLC0415

        raise typer.Exit(print_plan(target or bundled(BUNDLED_TARGET), dtype=dtype, device=device,
                                    kv_cache_memory=kv_cache_memory or 0.9, memory_gib=memory_gib))
    from specedge.service import run  # noqa: PLC0415
    from specedge_verifier.main import serve  # noqa: PLC0415

    settings = build(VerifierSettings, nats_url=nats_url, credentials=credentials, nats_wait_s=nats_wait,
                     redis_url=redis_url, metrics_port=metrics_port, name=name,
                     log_level=log_level, target=target or bundled(BUNDLED_TARGET), device=device, dtype=dtype,
                     max_sessions=max_sessions, max_len=max_len, attention=attention_backend(attention, exact),
                     kv_cache_memory=kv_cache_memory, tensor_parallel=tensor_parallel)
    run(functools.partial(serve, settings), settings.log_level)
