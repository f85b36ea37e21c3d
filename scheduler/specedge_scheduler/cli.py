"""`specedge scheduler`: command-line entry point (light; imports the service lazily)."""

from __future__ import annotations

import functools

from specedge.config import LogLevelOpt, Name, NatsUrl, RedisServiceSettings, RedisUrl, build


def command(
    nats_url: NatsUrl = "nats://127.0.0.1:4222",
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0",
    name: Name = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """Run the scheduler: assigns sessions to verifiers and edges and batches verification."""
    from specedge.service import run  # noqa: PLC0415
    from specedge_scheduler.main import serve  # noqa: PLC0415

    settings = build(RedisServiceSettings, nats_url=nats_url, redis_url=redis_url, name=name, log_level=log_level)
    run(functools.partial(serve, settings), settings.log_level)
