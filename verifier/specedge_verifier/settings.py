"""Typed settings of the verifier, built in `cli.command` and passed down."""

from __future__ import annotations

from specedge.config import RedisServiceSettings


class VerifierSettings(RedisServiceSettings):
    target: str
    device: str = "auto"
    dtype: str = "auto"
