"""Typed settings of the gateway, built in `cli.command` and passed down."""

from __future__ import annotations

from pydantic import Field

from specedge.config import RedisServiceSettings


class GatewaySettings(RedisServiceSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
