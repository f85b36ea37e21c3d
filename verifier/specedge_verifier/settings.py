"""Typed settings of the verifier, built in `cli.command` and passed down."""

from __future__ import annotations

from pydantic import Field

from specedge.config import ATTENTION_PATTERN, RedisServiceSettings


class VerifierSettings(RedisServiceSettings):
    target: str
    device: str = "auto"
    dtype: str = "auto"
    attention: str = Field(default="exact", pattern=ATTENTION_PATTERN)  # the runner's backend
    # the KV pool: GiB above 1, else the fraction of device memory for everything (None: max_sessions full ones)
    kv_cache_memory: float | None = Field(default=None, gt=0)
    max_sessions: int = Field(default=8, ge=1, le=4096)
    max_len: int = Field(default=4096, ge=16)  # most committed tokens per session
    metrics_port: int = Field(default=0, ge=0, le=65535)  # /metrics on this port (0: off)
    tensor_parallel: int = Field(default=1, ge=1, le=64)  # ranks (GPUs of this machine) the target spans
