"""Typed settings of the gateway, built in `cli.command` and passed down."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from specedge.config import RedisServiceSettings


class GatewaySettings(RedisServiceSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    tokenizer: str  # the target model's folder: its tokenizer and chat template
    max_context: int = Field(default=4096, ge=16)  # prompt + output tokens per request
    max_body_mib: float = Field(default=4.0, gt=0)  # a larger request body gets 413 before it is read
    default_max_tokens: int = Field(default=256, ge=1)
    require_api_key: bool = True  # False: anyone may call (a private, single-user setup)
    max_concurrent_per_key: int = Field(default=16, ge=1)  # requests of one user at once (429 beyond)
    reasoning_parser: Literal["", "qwen3"] = ""  # qwen3: a reply's <think> part as reasoning_content
    tool_call_parser: Literal["", "hermes"] = ""  # hermes: a reply's <tool_call> blocks as tool_calls (`auto`)
    lenient: bool = False  # ignore (with a warning) request fields nobody knows, as vLLM does; else 400
    dashboard: bool = True  # serve the live view at /dashboard (open, like /metrics: no prompt content)
