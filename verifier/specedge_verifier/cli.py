"""`specedge verifier`: command-line entry point (light; torch is imported by the service)."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from specedge.config import Credentials, Device, Dtype, LogLevelOpt, MetricsPort, Name, NatsUrl, RedisUrl, build
from specedge.models import BUNDLED_TARGET, bundled
from specedge_verifier.settings import VerifierSettings


def command(
    nats_url: NatsUrl = "nats://127.0.0.1:4222",
    credentials: Credentials = None,
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0",
    target: Annotated[str | None, typer.Option(
        "--target", envvar="SPECEDGE_TARGET",
        help="Target model: a local path or a hub id (default: the bundled tiny target).")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_sessions: Annotated[int, typer.Option(
        "--max-sessions", envvar="SPECEDGE_MAX_SESSIONS", help="KV cache slots (sessions held at once).")] = 8,
    max_len: Annotated[int, typer.Option(
        "--max-len", envvar="SPECEDGE_MAX_LEN", help="Most tokens (prompt + output) per session.")] = 4096,
    metrics_port: MetricsPort = 0,
    name: Name = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """Run a verifier: holds the target model and verifies batches of draft trees."""
    from specedge.service import run  # noqa: PLC0415
    from specedge_verifier.main import serve  # noqa: PLC0415

    settings = build(VerifierSettings, nats_url=nats_url, credentials=credentials,
                     redis_url=redis_url, metrics_port=metrics_port, name=name,
                     log_level=log_level, target=target or bundled(BUNDLED_TARGET), device=device, dtype=dtype,
                     max_sessions=max_sessions, max_len=max_len)
    run(functools.partial(serve, settings), settings.log_level)
