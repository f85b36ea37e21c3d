"""Typed settings of the edge agent, built in `cli.command` and passed down."""

from __future__ import annotations

from pydantic import Field

from specedge.config import ServiceSettings


class EdgeAgentSettings(ServiceSettings):
    draft: str
    device: str = "auto"
    dtype: str = "auto"
    max_sessions: int = Field(default=4, ge=1, le=1024)
    max_len: int = Field(default=4096, ge=16)  # most tokens (prompt + output) per session
