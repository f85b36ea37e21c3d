"""The `specedge` command: one subcommand per role, plus `up` and `status`.

Role subcommands (`gateway`, `scheduler`, `verifier`, `edge-agent`) come from the
installed service distributions through the `specedge.commands` entry-point group, so
an edge machine with only `edge-agent` installed gets only that subcommand; `bench` and
`bench-verify` come the same way from the `specedge-bench` distribution. Each
subcommand module is light; heavy imports happen inside the command.
"""

from __future__ import annotations

import asyncio
import json
from importlib.metadata import entry_points

import typer

from specedge import keys_cli, nats_auth_cli
from specedge.config import (
    DEFAULT_NATS_URL,
    DEFAULT_REDIS_URL,
    Attention,
    Credentials,
    Device,
    Dtype,
    Exact,
    LogLevelOpt,
    NatsUrl,
    RedisUrl,
    UpSettings,
    attention_backend,
    default,
)

app = typer.Typer(
    name="specedge",
    help="SpecEdge: speculative decoding with drafts on users' own GPUs. One subcommand per role.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_cli.app, name="keys")
app.add_typer(nats_auth_cli.app, name="nats-auth")


@app.command()
def up(
    nats_url: str | None = typer.Option(
        None, "--nats-url", envvar="SPECEDGE_NATS_URL",
        help="Use this NATS server instead of starting an embedded one."),
    nats_nodes: int = typer.Option(
        default(UpSettings, "nats_nodes"), "--nats-nodes", min=1, max=9, envvar="SPECEDGE_NATS_NODES",
        help="Embedded NATS: a cluster of this many nodes (routed on loopback) instead of one server."),
    redis_url: str | None = typer.Option(
        None, "--redis-url", envvar="SPECEDGE_REDIS_URL",
        help="Use this Redis server instead of starting an embedded one."),
    redis_ha: bool = typer.Option(
        default(UpSettings, "redis_ha"), "--redis-ha/--no-redis-ha", envvar="SPECEDGE_REDIS_HA",
        help="Embedded Redis: a primary, a replica and three Sentinels (clients follow a failover)."),
    host: str = typer.Option(default(UpSettings, "host"), "--host", envvar="SPECEDGE_HOST",
                             help="Gateway bind address."),
    port: int = typer.Option(default(UpSettings, "port"), "--port", envvar="SPECEDGE_PORT",
                             help="Gateway port (0 picks a free one)."),
    edges: int = typer.Option(default(UpSettings, "edges"), "--edges", min=0, envvar="SPECEDGE_EDGES",
                              help="Edge agents to start."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="SPECEDGE_API_KEY", help="Use this gateway API key instead of a generated one."),
    server_drafter: bool = typer.Option(
        default(UpSettings, "server_drafter"), "--server-drafter/--no-server-drafter", envvar="SPECEDGE_SERVER_DRAFTER",
        help="Start a server-side drafter (for mode server-only and when no edge is free)."),
    ready_timeout_s: float = typer.Option(
        default(UpSettings, "ready_timeout_s"), "--ready-timeout", envvar="SPECEDGE_READY_TIMEOUT",
        help="Seconds to wait for all services."),
    dtype: Dtype = default(UpSettings, "dtype"),
    attention: Attention = default(UpSettings, "attention"),
    exact: Exact = None,
    log_level: LogLevelOpt = default(UpSettings, "log_level"),
) -> None:
    """Run the whole system on this machine: nats-server, redis-server and the four services."""
    from specedge.up import run_up  # noqa: PLC0415 - keep `--help` fast

    raise SystemExit(run_up(UpSettings(
        nats_url=nats_url, nats_nodes=nats_nodes, redis_url=redis_url, redis_ha=redis_ha, host=host, port=port,
        edges=edges, api_key=api_key,
        server_drafter=server_drafter, ready_timeout_s=ready_timeout_s, log_level=log_level, dtype=dtype,
        attention=attention_backend(attention, exact),
    )))


@app.command()
def status(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    credentials: Credentials = None,
    wait_s: float = typer.Option(0.5, "--wait", help="Seconds to collect answers."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the services registered on a NATS server."""
    from specedge import bus, registry  # noqa: PLC0415

    async def ask() -> list:
        async with bus.connect(nats_url, name="specedge-status", initial_timeout_s=5, credentials=credentials) as nc:
            return await registry.discover(nc, wait_s)

    try:
        found = asyncio.run(ask())
    except ConnectionError as exc:
        typer.echo(str(exc), err=True)
        raise SystemExit(2) from None
    if as_json:
        typer.echo(json.dumps([{"role": a.role, "name": a.name, "instance_id": a.instance_id,
                                "details": a.details} for a in found], indent=2))
        return
    for a in found:
        extra = " ".join(f"{k}={v}" for k, v in sorted(a.details.items()))
        typer.echo(f"{a.role:<11} {a.name:<32} {extra}")
    if not found:
        typer.echo("no services registered", err=True)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="The prompt text."),
    mode: str = typer.Option("specedge", "--mode", help="autoregressive, server-only or specedge."),
    chat: bool = typer.Option(False, "--chat", help="Apply the target's chat template to the prompt."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Most new tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, same output in every mode)."),
    target: str | None = typer.Option(None, "--target", envvar="SPECEDGE_TARGET",
                                      help="Target model path or hub id (default: bundled tiny target)."),
    draft: str | None = typer.Option(None, "--draft", envvar="SPECEDGE_DRAFT",
                                     help="Draft model path or hub id (default: bundled tiny draft)."),
    budget: int = typer.Option(32, "--budget", min=0, help="Draft tree: most nodes."),
    depth: int = typer.Option(4, "--depth", min=0, help="Draft tree: most levels (draft passes)."),
    branch: int = typer.Option(16, "--branch", min=1, help="Draft tree: candidates per expanded node."),
    beams: int = typer.Option(32, "--beams", min=1, help="Draft tree: nodes added per draft pass."),
    rtt_ms: float = typer.Option(0.0, "--rtt-ms", min=0.0, help="specedge mode: simulated round trip."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    attention: Attention = "exact",
    exact: Exact = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the text and statistics."),
) -> None:
    """Generate text in one process, without services, in any of the three modes."""
    from specedge.engine.cli_generate import GenerateSettings, run_generate  # noqa: PLC0415
    from specedge.engine.loading import ModelLoadError  # noqa: PLC0415

    try:
        settings = GenerateSettings(
            prompt=prompt, mode=mode, chat=chat, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, target=target, draft=draft, budget=budget, depth=depth, branch=branch,
            beams=beams, rtt_ms=rtt_ms, device=device, dtype=dtype, attention=attention_backend(attention, exact))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        typer.echo(run_generate(settings, as_json))
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


@app.command("auth-callout")
def auth_callout(
    issuer: str = typer.Option(..., "--issuer", envvar="SPECEDGE_ISSUER",
                               help="The issuer's seed file (issuer.nk from `specedge nats-auth init --callout`)."),
    system_credentials: str | None = typer.Option(
        None, "--system-credentials", envvar="SPECEDGE_SYSTEM_CREDENTIALS",
        help="A system-account login (specedge-system): disconnects edges whose key is revoked."),
    check_s: float = typer.Option(1.0, "--check-s", min=0.05, envvar="SPECEDGE_CHECK_S",
                                  help="How often the keys of joined edges are checked again (seconds)."),
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    credentials: Credentials = None,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    log_level: LogLevelOpt = "info",
) -> None:
    """Run the NATS auth callout: edges join with a user's API key or an edge token, no reload."""
    import functools  # noqa: PLC0415

    from specedge.auth_callout import AuthCalloutSettings, serve  # noqa: PLC0415
    from specedge.config import build  # noqa: PLC0415
    from specedge.service import run  # noqa: PLC0415

    settings = build(AuthCalloutSettings, nats_url=nats_url, credentials=credentials, redis_url=redis_url,
                     issuer=issuer, system_credentials=system_credentials, check_s=check_s, log_level=log_level)
    run(functools.partial(serve, settings), settings.log_level)


def _add_role_commands() -> None:
    for ep in sorted(entry_points(group="specedge.commands"), key=lambda e: e.name):
        command = ep.load()
        app.command(name=ep.name, context_settings=getattr(command, "context_settings", None))(command)


_add_role_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
