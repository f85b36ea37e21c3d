"""Typed settings shared by the services, and the command-line options that fill them.

Each service has one frozen pydantic settings model, built in its `main()` from the
command line (every flag also reads a `SPECEDGE_…` environment variable) and passed down.
No module reads the environment on import.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LogLevel = Literal["debug", "info", "warning", "error"]

NatsUrl = Annotated[str, typer.Option("--nats-url", envvar="SPECEDGE_NATS_URL",
                                      help="NATS server URL, or a comma-separated list of a cluster's nodes.")]
Credentials = Annotated[
    str | None, typer.Option("--credentials", envvar="SPECEDGE_CREDENTIALS",
                             help="NATS credentials file from `specedge nats-auth` (default: none, or "
                                  "user:password in --nats-url).")
]
RedisUrl = Annotated[str, typer.Option("--redis-url", envvar="SPECEDGE_REDIS_URL", help="Redis server URL.")]
Name = Annotated[
    str | None,
    typer.Option("--name", envvar="SPECEDGE_NAME", help="Human-readable instance name (default: generated)."),
]
Device = Annotated[
    str, typer.Option("--device", envvar="SPECEDGE_DEVICE", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N.")
]
Dtype = Annotated[str, typer.Option("--dtype", envvar="SPECEDGE_DTYPE",
                                     help="auto (float32 on CPU, the checkpoint's on CUDA), float32, bfloat16 or "
                                          "float16; a checkpoint stored in another dtype is cast at load.")]
ATTENTION_CHOICES = ("exact", "flex", "reference")
ATTENTION_PATTERN = "^(exact|flex|reference)$"
Attention = Annotated[
    str, typer.Option("--attention", envvar="SPECEDGE_ATTENTION",
                      help="exact (batch-invariant: output bit for bit the autoregressive mode's), flex (paged "
                           "KV pool, compiled FlexAttention; faster, exact to float rounding) or reference "
                           "(a dense slot per session, SDPA).")
]
Exact = Annotated[
    bool | None, typer.Option("--exact/--fast", envvar="SPECEDGE_EXACT", show_default=False,
                              help="Shorthand: --exact is --attention exact (the default); --fast trades bit-exactness "
                                   "for speed (--attention flex, or reference if named).")
]


def default(settings: type[BaseModel], field: str) -> Any:
    """A settings model's default for `field`: what its command-line option defaults to
    (declared once, in the model)."""
    return settings.model_fields[field].default


def attention_backend(attention: str, exact: bool | None) -> str:
    """The runner's attention backend from `--attention` and `--exact/--fast`."""
    if attention not in ATTENTION_CHOICES:
        raise typer.BadParameter(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, not {attention!r}")
    if exact is None:
        return attention
    if exact:
        return "exact"
    return "flex" if attention == "exact" else attention
MetricsPort = Annotated[
    int, typer.Option("--metrics-port", envvar="SPECEDGE_METRICS_PORT",
                      help="Serve Prometheus /metrics on this port (0: off).")
]
NatsWait = Annotated[
    float, typer.Option("--nats-wait", envvar="SPECEDGE_NATS_WAIT",
                        help="Seconds to wait for NATS at startup before failing with a clear error.")
]
LogLevelOpt = Annotated[
    str, typer.Option("--log-level", envvar="SPECEDGE_LOG_LEVEL", help="debug, info, warning or error.")
]


class ServiceSettings(BaseModel):
    """What every service needs: where NATS is, its name and how loudly to log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats_url: str = DEFAULT_NATS_URL
    credentials: str | None = None  # a `specedge nats-auth` credentials file
    name: str | None = None
    log_level: LogLevel = "info"
    heartbeat_s: float = 2.0
    nats_wait_s: float = Field(default=30.0, gt=0)  # how long to wait for NATS at startup before failing

    @field_validator("nats_url")
    @classmethod
    def _nats_scheme(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",")]
        if not all(u.startswith(("nats://", "tls://", "ws://", "wss://")) for u in urls):
            raise ValueError(f"expected a nats://, tls://, ws:// or wss:// URL (or a comma-separated list of them: "
                             f"a cluster's nodes), got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower() if isinstance(value, str) else value


class RedisServiceSettings(ServiceSettings):
    """A service that also keeps state in Redis."""

    redis_url: str = DEFAULT_REDIS_URL

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
            raise ValueError(f"expected a redis://, rediss://, unix:// or redis+sentinel://SENTINELS/SERVICE URL, "
                             f"got {value!r}")
        return value


def build(settings_type: type[BaseModel], **values: object) -> BaseModel:
    """Build settings from CLI values; a bad value is a usage error, not a traceback."""
    try:
        return settings_type(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


class UpSettings(BaseModel):
    """`specedge up`: the whole system on one machine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats_url: str | None = None
    nats_nodes: int = Field(default=1, ge=1, le=9)  # the embedded NATS: one server, or a cluster of this many
    redis_url: str | None = None
    redis_ha: bool = False  # the embedded Redis: a primary, a replica and three Sentinels
    host: str = "127.0.0.1"
    port: int = 8000
    edges: int = 2
    api_key: str | None = None
    server_drafter: bool = True
    ready_timeout_s: float = 120.0
    log_level: str = "info"
    dtype: str = "auto"  # the verifier's and the edges' models
    attention: str = "exact"  # the verifier's and the edges' attention backend
