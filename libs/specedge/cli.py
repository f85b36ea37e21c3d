"""The `specedge` command: one subcommand per role, plus `up` and `status`.

Role subcommands (`gateway`, `scheduler`, `verifier`, `edge-agent`) come from the
installed service distributions through the `specedge.commands` entry-point group, so
an edge machine with only `edge-agent` installed gets only that subcommand. Each
subcommand module is light; heavy imports happen inside the command.
"""

from __future__ import annotations

import asyncio
import json
from importlib.metadata import entry_points

import typer

from specedge import keys_cli, nats_auth_cli
from specedge.config import Attention, Credentials, Device, Dtype, Exact, LogLevelOpt, NatsUrl, attention_backend

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
    redis_url: str | None = typer.Option(
        None, "--redis-url", envvar="SPECEDGE_REDIS_URL",
        help="Use this Redis server instead of starting an embedded one."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="SPECEDGE_HOST", help="Gateway bind address."),
    port: int = typer.Option(8000, "--port", envvar="SPECEDGE_PORT", help="Gateway port (0 picks a free one)."),
    edges: int = typer.Option(2, "--edges", min=0, envvar="SPECEDGE_EDGES", help="Edge agents to start."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="SPECEDGE_API_KEY", help="Use this gateway API key instead of a generated one."),
    server_drafter: bool = typer.Option(
        True, "--server-drafter/--no-server-drafter", envvar="SPECEDGE_SERVER_DRAFTER",
        help="Start a server-side drafter (for mode server-only and when no edge is free)."),
    ready_timeout_s: float = typer.Option(
        120.0, "--ready-timeout", envvar="SPECEDGE_READY_TIMEOUT", help="Seconds to wait for all services."),
    dtype: Dtype = "auto",
    attention: Attention = "exact",
    exact: Exact = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """Run the whole system on this machine: nats-server, redis-server and the four services."""
    from specedge.up import UpSettings, run_up  # noqa: PLC0415 - keep `--help` fast

    raise SystemExit(run_up(UpSettings(
        nats_url=nats_url, redis_url=redis_url, host=host, port=port, edges=edges, api_key=api_key,
        server_drafter=server_drafter, ready_timeout_s=ready_timeout_s, log_level=log_level, dtype=dtype,
        attention=attention_backend(attention, exact),
    )))


@app.command()
def bench(
    modes: str = typer.Option("autoregressive,server-only,specedge", "--modes", help="Comma-separated modes."),
    prompts: str | None = typer.Option(None, "--prompts", help="JSONL: `turns` (first used) or `prompt` per line."),
    categories: str | None = typer.Option(None, "--categories", help="Comma-separated (default: the six "
                                          "Spec-Bench categories)."),
    num_prompts: int | None = typer.Option(None, "--num-prompts", min=1, help="Prompts per category (default 4)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="New tokens per prompt (default 64)."),
    batch_sizes: str | None = typer.Option(None, "--batch-sizes", help="Concurrent sessions (default 1,2,4)."),
    rtt_ms: float = typer.Option(14.0, "--rtt-ms", min=0.0, help="Round trip emulated on each edge's link."),
    server_price_per_h: float = typer.Option(5.05, "--server-price-per-h", min=0.0, help="Server $/hour."),
    edge_price_per_h: float = typer.Option(0.35, "--edge-price-per-h", min=0.0, help="Edge $/hour."),
    strategy: str = typer.Option("pipeline", "--strategy",
                                 help="The scheduler's strategy: pipeline, fifo, two-groups."),
    budget: int = typer.Option(32, "--budget", min=1, help="Edges' draft tree size."),
    depth: int = typer.Option(4, "--depth", min=1, help="Edges' draft tree depth."),
    server_budget: int = typer.Option(64, "--server-budget", min=1, help="The server drafter's tree size "
                                      "(server-only; the paper's baseline: 64)."),
    server_depth: int = typer.Option(4, "--server-depth", min=1, help="The server drafter's tree depth."),
    quick: bool = typer.Option(False, "--quick", help="3 categories, 2 prompts each, 32 tokens, batch 1,2."),
    otlp_endpoint: str | None = typer.Option(None, "--otlp-endpoint", help="Trace the services: OTLP/HTTP "
                                             "to this URL (default: their inherited OTEL_* environment)."),
    out: str = typer.Option("bench-out", "--out", help="Folder for results.json, report.md and plots."),
) -> None:
    """Benchmark the real system on this machine: modes side by side, the paper's table."""
    from specedge.bench import QUICK, BenchSettings, run_bench  # noqa: PLC0415

    defaults = QUICK if quick else {}
    # --quick picks Spec-Bench categories; a --prompts file's own are used as they are unless named
    values = {"categories": tuple(categories.split(",")) if categories
              else None if prompts else defaults.get("categories"),
              "num_prompts": num_prompts or defaults.get("num_prompts"),
              "max_tokens": max_tokens or defaults.get("max_tokens"),
              "batch_sizes": tuple(int(b) for b in batch_sizes.split(",")) if batch_sizes
              else defaults.get("batch_sizes")}
    try:
        settings = BenchSettings(modes=tuple(m.strip() for m in modes.split(",")), prompts=prompts, rtt_ms=rtt_ms,
                                 server_price_per_h=server_price_per_h, edge_price_per_h=edge_price_per_h,
                                 strategy=strategy, budget=budget, depth=depth, server_budget=server_budget,
                                 server_depth=server_depth, otlp_endpoint=otlp_endpoint, out=out,
                                 **{k: v for k, v in values.items() if v is not None})
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        raise SystemExit(run_bench(settings))
    except (ValueError, RuntimeError, TimeoutError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


@app.command()
def status(
    nats_url: NatsUrl = "nats://127.0.0.1:4222",
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


@app.command(name="bench-verify", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                                     "help_option_names": []})
def bench_verify(ctx: typer.Context) -> None:
    """The verifier engine's benchmark: the verify step per attention backend (--help for its options)."""
    from specedge.engine.bench_verify import main  # noqa: PLC0415

    raise SystemExit(main(ctx.args))


def _add_role_commands() -> None:
    for ep in sorted(entry_points(group="specedge.commands"), key=lambda e: e.name):
        app.command(name=ep.name)(ep.load())


_add_role_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
