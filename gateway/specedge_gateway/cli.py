"""`specedge gateway`: command-line entry point (light; imports the service lazily)."""

from __future__ import annotations

from typing import Annotated

import typer

from specedge.config import Credentials, LogLevelOpt, Name, NatsUrl, NatsWait, RedisUrl, build, default
from specedge.models import BUNDLED_TARGET, bundled
from specedge_gateway.settings import GatewaySettings


def command(
    nats_url: NatsUrl = default(GatewaySettings, "nats_url"),
    credentials: Credentials = default(GatewaySettings, "credentials"),
    nats_wait: NatsWait = default(GatewaySettings, "nats_wait_s"),
    redis_url: RedisUrl = default(GatewaySettings, "redis_url"),
    host: Annotated[str, typer.Option("--host", envvar="SPECEDGE_HOST", help="Address to listen on.")]
    = default(GatewaySettings, "host"),
    port: Annotated[int, typer.Option("--port", envvar="SPECEDGE_PORT", help="Port to listen on.")]
    = default(GatewaySettings, "port"),
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", envvar="SPECEDGE_TOKENIZER",
        help="The target model's folder, or its hub id in the local Hugging Face cache, for its tokenizer and chat "
             "template (default: the bundled target).")] = None,
    max_context: Annotated[int, typer.Option(
        "--max-context", envvar="SPECEDGE_MAX_CONTEXT", help="Most prompt + output tokens per request.")]
    = default(GatewaySettings, "max_context"),
    max_body_mib: Annotated[float, typer.Option(
        "--max-body-mib", envvar="SPECEDGE_MAX_BODY_MIB", min=0.01,
        help="Largest request body in MiB; a larger one gets 413 before it is read or its key checked.")]
    = default(GatewaySettings, "max_body_mib"),
    require_api_key: Annotated[bool, typer.Option(
        "--require-api-key/--no-api-key", envvar="SPECEDGE_REQUIRE_API_KEY",
        help="Require `Authorization: Bearer KEY` (keys from `specedge keys create`).")]
    = default(GatewaySettings, "require_api_key"),
    max_concurrent_per_key: Annotated[int, typer.Option(
        "--max-concurrent-per-key", envvar="SPECEDGE_MAX_CONCURRENT_PER_KEY",
        help="Requests one API key's user may have generating at once; more get 429.")]
    = default(GatewaySettings, "max_concurrent_per_key"),
    reasoning_parser: Annotated[str, typer.Option(
        "--reasoning-parser", envvar="SPECEDGE_REASONING_PARSER",
        help="qwen3: what a chat reply writes inside <think>…</think> comes back as reasoning_content, as "
             "vLLM's parser of that name does (default: none).")] = default(GatewaySettings, "reasoning_parser"),
    tool_call_parser: Annotated[str, typer.Option(
        "--tool-call-parser", envvar="SPECEDGE_TOOL_CALL_PARSER",
        help="hermes: with tools and tool_choice auto, the <tool_call> blocks a chat reply writes come back as "
             "tool_calls, as vLLM's parser of that name does (default: none: they stay text).")]
    = default(GatewaySettings, "tool_call_parser"),
    lenient: Annotated[bool, typer.Option(
        "--lenient/--strict", envvar="SPECEDGE_LENIENT",
        help="Ignore request fields nobody knows, with a warning (vLLM's behaviour); by default they get 400 as "
             "OpenAI's API answers. Fields SpecEdge knows but does not serve are a 400 either way.")]
    = default(GatewaySettings, "lenient"),
    dashboard: Annotated[bool, typer.Option(
        "--dashboard/--no-dashboard", envvar="SPECEDGE_DASHBOARD",
        help="Serve the live view at /dashboard (no API key needed; it shows timings, not prompts).")]
    = default(GatewaySettings, "dashboard"),
    name: Name = default(GatewaySettings, "name"),
    log_level: LogLevelOpt = default(GatewaySettings, "log_level"),
) -> None:
    """Run the gateway: the OpenAI-compatible HTTP API."""
    from specedge_gateway.main import main  # noqa: PLC0415

    main(build(GatewaySettings, nats_url=nats_url, credentials=credentials, nats_wait_s=nats_wait,
               redis_url=redis_url, host=host, port=port,
               tokenizer=tokenizer or bundled(BUNDLED_TARGET), max_context=max_context, max_body_mib=max_body_mib,
               require_api_key=require_api_key, max_concurrent_per_key=max_concurrent_per_key, dashboard=dashboard,
               lenient=lenient, reasoning_parser=reasoning_parser, tool_call_parser=tool_call_parser,
               name=name,
               log_level=log_level))
