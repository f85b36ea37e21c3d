"""`specedge edge-agent` and the standalone `edge-agent` command."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from edge_agent.settings import EdgeAgentSettings
from specedge.config import (
    Attention,
    Credentials,
    Device,
    Dtype,
    Exact,
    LogLevelOpt,
    Name,
    NatsUrl,
    attention_backend,
    build,
    default,
)
from specedge.models import BUNDLED_DRAFT, bundled
from specedge.protocol import MAX_TREES_AHEAD


def command(
    nats_url: NatsUrl = default(EdgeAgentSettings, "nats_url"),
    credentials: Credentials = default(EdgeAgentSettings, "credentials"),
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="SPECEDGE_API_KEY", show_default=False,
        help="Join with a user's API key or an edge token (see `specedge keys create`), through the "
             "deployment's auth callout: no account file needed.")] = default(EdgeAgentSettings, "api_key"),
    draft: Annotated[str | None, typer.Option(
        "--draft", envvar="SPECEDGE_DRAFT",
        help="Draft model: a local path or a hub id (default: the bundled tiny draft).")] = None,
    device: Device = default(EdgeAgentSettings, "device"),
    dtype: Dtype = default(EdgeAgentSettings, "dtype"),
    max_sessions: Annotated[int, typer.Option(
        "--max-sessions", envvar="SPECEDGE_MAX_SESSIONS", help="Most sessions drafted at once.")]
    = default(EdgeAgentSettings, "max_sessions"),
    max_len: Annotated[int, typer.Option(
        "--max-len", envvar="SPECEDGE_MAX_LEN", help="Most tokens (prompt + output) per session.")]
    = default(EdgeAgentSettings, "max_len"),
    attention: Attention = default(EdgeAgentSettings, "attention"),
    exact: Exact = None,
    user: Annotated[str, typer.Option(
        "--user", envvar="SPECEDGE_USER",
        help="Draft only for this user's requests (the user an API key maps to). Default: the shared pool.")]
    = default(EdgeAgentSettings, "user"),
    server_side: Annotated[bool, typer.Option(
        "--server-side", envvar="SPECEDGE_SERVER_SIDE",
        help="Run as the operator's server-side drafter: used for mode server-only and when no edge is free.")]
    = default(EdgeAgentSettings, "server_side"),
    proactive: Annotated[bool | None, typer.Option(
        "--proactive/--no-proactive", envvar="SPECEDGE_PROACTIVE", show_default=False,
        help="Draft the next tree while one is out (default: on, off with --server-side).")]
    = default(EdgeAgentSettings, "proactive"),
    send_ahead: Annotated[bool, typer.Option(
        "--send-ahead/--no-send-ahead", envvar="SPECEDGE_SEND_AHEAD",
        help="Send a proactive tree as soon as it is drafted, before the result it guesses arrives "
             "(verified at once if the guess was right).")] = default(EdgeAgentSettings, "send_ahead"),
    trees_ahead: Annotated[int, typer.Option(
        "--trees-ahead", envvar="SPECEDGE_TREES_AHEAD", min=1, max=MAX_TREES_AHEAD,
        help="With --send-ahead: how many trees a session drafts and sends ahead in a chain, each "
             "from the guessed result of the one before.")] = default(EdgeAgentSettings, "trees_ahead"),
    name: Name = default(EdgeAgentSettings, "name"),
    log_level: LogLevelOpt = default(EdgeAgentSettings, "log_level"),
) -> None:
    """Run an edge agent: drafts token trees with a small model on this machine's GPU."""
    from edge_agent.main import serve  # noqa: PLC0415
    from specedge.service import run  # noqa: PLC0415

    if credentials:  # the account says whom this edge drafts for; the flags may only repeat it
        identity = _identity(credentials)
        user, server_side = user or identity.user, server_side or identity.pool == "server"
    settings = build(EdgeAgentSettings, nats_url=nats_url, credentials=credentials, api_key=api_key,
                     draft=draft or bundled(BUNDLED_DRAFT),
                     device=device, dtype=dtype, max_sessions=max_sessions, max_len=max_len,
                     attention=attention_backend(attention, exact),
                     user=user,
                     server_side=server_side, proactive=proactive, send_ahead=send_ahead, trees_ahead=trees_ahead,
                     name=name, log_level=log_level)
    run(functools.partial(serve, settings), settings.log_level)


def _identity(path: str):
    from specedge.nats_auth import Credentials as Creds  # noqa: PLC0415

    try:
        return Creds.load(path).identity
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--credentials") from None


def main() -> None:
    """The standalone `edge-agent` command (same options as `specedge edge-agent`)."""
    typer.run(command)
