"""Typed settings of the scheduler, built in `cli.command` and passed down. The policy's and
the edge guard's defaults are theirs (`PolicyConfig`, `GuardLimits`): read here, not repeated."""

from __future__ import annotations

from pydantic import Field

from specedge.config import RedisServiceSettings
from specedge_scheduler.guard import GuardLimits
from specedge_scheduler.policy import PolicyConfig, Strategy

_P, _G = PolicyConfig, GuardLimits


class SchedulerSettings(RedisServiceSettings):
    max_batch: int = Field(default=_P.max_batch, ge=1, le=1024)
    edge_timeout_s: float = Field(default=_P.edge_timeout_s, gt=0)
    verifier_timeout_s: float = Field(default=_P.verifier_timeout_s, gt=0)
    draft_timeout_s: float = Field(default=_P.draft_timeout_s, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)
    session_ttl_s: int = Field(default=3600, ge=10)
    strategy: Strategy = _P.strategy
    budget: int = Field(default=_P.budget, ge=0)
    server_budget: int = Field(default=_P.server_budget, ge=0)  # 0: same as budget
    depth: int = Field(default=_P.depth, ge=0)
    server_depth: int = Field(default=_P.server_depth, ge=0)  # 0: same as depth
    edge_offence_limit: int = Field(default=_G.offence_limit, ge=1)  # refused messages that cut an edge off
    edge_suspend_s: float = Field(default=_G.suspend_s, ge=1)  # how long a cut-off edge stays suspended
    metrics_port: int = Field(default=0, ge=0, le=65535)  # /metrics on this port (0: off)

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(max_batch=self.max_batch, edge_timeout_s=self.edge_timeout_s,
                            verifier_timeout_s=self.verifier_timeout_s, draft_timeout_s=self.draft_timeout_s,
                            strategy=self.strategy, budget=self.budget, depth=self.depth,
                            server_budget=self.server_budget, server_depth=self.server_depth)

    def guard_limits(self) -> GuardLimits:
        return GuardLimits(offence_limit=self.edge_offence_limit, suspend_s=self.edge_suspend_s)
