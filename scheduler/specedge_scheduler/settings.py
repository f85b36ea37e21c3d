"""Typed settings of the scheduler, built in `cli.command` and passed down."""

from __future__ import annotations

from pydantic import Field

from specedge.config import RedisServiceSettings
from specedge_scheduler.guard import GuardLimits
from specedge_scheduler.policy import Strategy


class SchedulerSettings(RedisServiceSettings):
    max_batch: int = Field(default=8, ge=1, le=1024)
    edge_timeout_s: float = Field(default=6.0, gt=0)
    verifier_timeout_s: float = Field(default=6.0, gt=0)
    draft_timeout_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)
    session_ttl_s: int = Field(default=3600, ge=10)
    strategy: Strategy = "pipeline"
    budget: int = Field(default=32, ge=0)
    server_budget: int = Field(default=0, ge=0)  # 0: same as budget
    depth: int = Field(default=4, ge=0)
    server_depth: int = Field(default=0, ge=0)  # 0: same as depth
    edge_offence_limit: int = Field(default=GuardLimits.offence_limit, ge=1)  # refused messages that cut an edge off
    edge_suspend_s: float = Field(default=GuardLimits.suspend_s, ge=1)  # how long a cut-off edge stays suspended
    metrics_port: int = Field(default=0, ge=0, le=65535)  # /metrics on this port (0: off)
