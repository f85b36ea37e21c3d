"""`specedge bench` and `specedge bench-verify`: added to the `specedge` command when this
distribution is installed (entry points `specedge.commands`)."""

from __future__ import annotations

import typer


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
    from specedge_bench.serving import QUICK, BenchSettings, run_bench  # noqa: PLC0415

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


def bench_verify(ctx: typer.Context) -> None:
    """The verifier engine's benchmark: the verify step per attention backend (--help for its options)."""
    from specedge_bench.verify import main  # noqa: PLC0415

    raise SystemExit(main(ctx.args))


# its own argparse parses every argument, --help included
bench_verify.context_settings = {"allow_extra_args": True, "ignore_unknown_options": True,  # type: ignore[attr-defined]
                                 "help_option_names": []}
