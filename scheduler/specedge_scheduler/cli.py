"""`specedge scheduler`: command-line entry point (light; imports the service lazily)."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from specedge.config import Credentials, LogLevelOpt, MetricsPort, Name, NatsUrl, NatsWait, RedisUrl, build, default
from specedge_scheduler.settings import SchedulerSettings


def command(
    nats_url: NatsUrl = default(SchedulerSettings, "nats_url"),
    credentials: Credentials = default(SchedulerSettings, "credentials"),
    nats_wait: NatsWait = default(SchedulerSettings, "nats_wait_s"),
    redis_url: RedisUrl = default(SchedulerSettings, "redis_url"),
    max_batch: Annotated[int, typer.Option(
        "--max-batch", envvar="SPECEDGE_MAX_BATCH", help="Most trees verified in one pass.")]
    = default(SchedulerSettings, "max_batch"),
    edge_timeout: Annotated[float, typer.Option(
        "--edge-timeout", envvar="SPECEDGE_EDGE_TIMEOUT",
        help="Seconds without a heartbeat before an edge's sessions continue server-side.")]
    = default(SchedulerSettings, "edge_timeout_s"),
    verifier_timeout: Annotated[float, typer.Option(
        "--verifier-timeout", envvar="SPECEDGE_VERIFIER_TIMEOUT",
        help="Seconds without a heartbeat before a verifier's sessions move to another verifier.")]
    = default(SchedulerSettings, "verifier_timeout_s"),
    draft_timeout: Annotated[float, typer.Option(
        "--draft-timeout", envvar="SPECEDGE_DRAFT_TIMEOUT",
        help="Most seconds an edge may take to send a session's next draft before it continues server-side "
             "(a measured edge gets 4x its recent peak turnaround, at least 1 s).")]
    = default(SchedulerSettings, "draft_timeout_s"),
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", envvar="SPECEDGE_REQUEST_TIMEOUT",
        help="Seconds to wait for a verifier's answer (a lost one is asked again), and for Redis to come back.")]
    = default(SchedulerSettings, "request_timeout_s"),
    session_ttl: Annotated[int, typer.Option(
        "--session-ttl", envvar="SPECEDGE_SESSION_TTL",
        help="Seconds a session's Redis keys outlive its last commit (bounds what a crash leaves).")]
    = default(SchedulerSettings, "session_ttl_s"),
    strategy: Annotated[str, typer.Option(
        "--strategy", envvar="SPECEDGE_STRATEGY",
        help="Batching: pipeline (measured, phase-grouped), fifo or two-groups (the reference's).")]
    = default(SchedulerSettings, "strategy"),
    budget: Annotated[int, typer.Option(
        "--budget", envvar="SPECEDGE_BUDGET", help="Draft tree size edges are asked for.")]
    = default(SchedulerSettings, "budget"),
    server_budget: Annotated[int, typer.Option(
        "--server-budget", envvar="SPECEDGE_SERVER_BUDGET",
        help="Tree size for server-side drafters (0: same as --budget; the paper's server-only baseline uses 64).")]
    = default(SchedulerSettings, "server_budget"),
    depth: Annotated[int, typer.Option(
        "--depth", envvar="SPECEDGE_DEPTH", help="Draft tree depth edges are asked for.")]
    = default(SchedulerSettings, "depth"),
    server_depth: Annotated[int, typer.Option(
        "--server-depth", envvar="SPECEDGE_SERVER_DEPTH",
        help="Tree depth for server-side drafters (0: same as --depth).")] = default(SchedulerSettings, "server_depth"),
    edge_offence_limit: Annotated[int, typer.Option(
        "--edge-offence-limit", envvar="SPECEDGE_EDGE_OFFENCE_LIMIT", min=1,
        help="Refused messages (malformed, oversized, too fast, unsolicited) within 10 s that cut an edge off.")]
    = default(SchedulerSettings, "edge_offence_limit"),
    edge_suspend: Annotated[float, typer.Option(
        "--edge-suspend", envvar="SPECEDGE_EDGE_SUSPEND", min=1.0,
        help="Seconds an edge that was cut off stays suspended (for every scheduler, through Redis).")]
    = default(SchedulerSettings, "edge_suspend_s"),
    metrics_port: MetricsPort = default(SchedulerSettings, "metrics_port"),
    name: Name = default(SchedulerSettings, "name"),
    log_level: LogLevelOpt = default(SchedulerSettings, "log_level"),
) -> None:
    """Run the scheduler: assigns sessions to verifiers and edges and batches verification."""
    from specedge.service import run  # noqa: PLC0415
    from specedge_scheduler.main import serve  # noqa: PLC0415

    settings = build(SchedulerSettings, nats_url=nats_url, credentials=credentials, nats_wait_s=nats_wait,
                     redis_url=redis_url, max_batch=max_batch,
                     edge_timeout_s=edge_timeout, verifier_timeout_s=verifier_timeout,
                     draft_timeout_s=draft_timeout, request_timeout_s=request_timeout,
                     session_ttl_s=session_ttl, strategy=strategy, budget=budget,
                     server_budget=server_budget, depth=depth, server_depth=server_depth,
                     edge_offence_limit=edge_offence_limit, edge_suspend_s=edge_suspend,
                     metrics_port=metrics_port, name=name, log_level=log_level)
    run(functools.partial(serve, settings), settings.log_level)
