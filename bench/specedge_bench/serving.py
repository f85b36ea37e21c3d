"""`specedge bench`: the real system on this machine, mode against mode, like the paper's table.

Starts real nats-server and redis-server, one verifier, a scheduler, a server-side drafter
(no proactive drafting: nothing to hide beside the verifier) and one edge agent per unit
of the largest batch size (each on an emulated WAN link, `wan`), all
as `specedge` processes with one torch thread each. Where the machine has two cores or
more, the server side (verifier, server drafter) is pinned to the first core and the
edges — with nats-server, redis-server, the scheduler and the benchmark's own clients — to
the others, so that nothing borrows the server's time.

For each batch size B, mode and category, it runs the category's prompts B at a time as
concurrent sessions on the bus (first turn, chat template, greedy) and measures: tokens
per verification (per cycle), generated tokens, *server busy* seconds (the union of the
verifier's verification passes and the server drafter's drafting passes — in server-only
mode — as the services record them; they share a core, so overlaps count once),
inter-token latency (per session: from its first token event to its last, per token
after the first event), time to first token, and cost
(server $/h × wall + edges used × $/h × wall, per 1000 tokens). Server throughput is
reported per server busy second (the table's figure) and per wall second.
`results.json` also has the CPU seconds all services used in each run (`service_cpu_s`),
a figure other load on the machine disturbs less than wall time.

Server-side drafters' sessions are verified in lockstep (the scheduler waits for the
drafter's whole cohort), as a server running both models would batch them.

Writes `results.json`, `report.md` and PNG plots to `--out`. The services log at
`warning` unless `SPECEDGE_BENCH_LOG_LEVEL` says otherwise. They inherit the `OTEL_*`
environment; `--otlp-endpoint URL` turns their tracing on (OTLP/HTTP to URL) for this
run, and the report says whether tracing was on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats.errors
import psutil
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from specedge import bus, protocol, registry, subjects, telemetry
from specedge.launcher import Launcher
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled, chat_prompt_ids
from specedge.protocol import (
    Mode,
    SamplingSpec,
    ServiceStats,
    SessionOpen,
    SessionOpened,
    StatsRequest,
    TokenEvent,
    union_s,
)

log = logging.getLogger("specedge.bench")
MODES: tuple[Mode, ...] = ("autoregressive", "server-only", "specedge")
CATEGORIES = ("multi-turn", "translation", "summarization", "qa", "math_reasoning", "rag")


class BenchSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    modes: tuple[Mode, ...] = MODES
    prompts: str | None = None  # JSONL with `turns` or `prompt`; default: the bundled Spec-Bench copy
    categories: tuple[str, ...] | None = None  # default: the six Spec-Bench ones, or all of a --prompts file
    num_prompts: int = Field(default=4, ge=1)  # per category
    max_tokens: int = Field(default=64, ge=1)
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    rtt_ms: float = Field(default=14.0, ge=0)
    server_price_per_h: float = Field(default=5.05, ge=0)
    edge_price_per_h: float = Field(default=0.35, ge=0)
    budget: int = Field(default=32, ge=1)
    server_budget: int = Field(default=64, ge=1)  # the paper's server-only baseline
    depth: int = Field(default=4, ge=1)
    server_depth: int = Field(default=4, ge=1)  # the paper's server-only baseline
    strategy: str = "pipeline"
    otlp_endpoint: str | None = None  # the services' OTEL_EXPORTER_OTLP_ENDPOINT (default: inherited)
    out: Path = Path("bench-out")
    target: str = Field(default_factory=lambda: bundled(BUNDLED_TARGET))
    draft: str = Field(default_factory=lambda: bundled(BUNDLED_DRAFT))


QUICK = {"categories": ("multi-turn", "math_reasoning", "rag"), "num_prompts": 2, "max_tokens": 32,
         "batch_sizes": (1, 2)}


def load_prompts(path: str | None, categories: Sequence[str], per_category: int) -> dict[str, list[str]]:
    """First turns (or `prompt`s) by category; MT-bench's eight categories count as `multi-turn`."""
    from importlib import resources  # noqa: PLC0415

    source = Path(path).open() if path else resources.files("specedge").joinpath("data/specbench_prompts.jsonl").open()
    with source:
        rows = [json.loads(line) for line in source if line.strip()]
    by_category: dict[str, list[str]] = {}
    for row in rows:
        category = row.get("category", "all")
        if category not in CATEGORIES and "turns" in row and len(row["turns"]) > 1:
            category = "multi-turn"
        text = row["turns"][0] if "turns" in row else row.get("prompt")
        if not isinstance(text, str):
            raise ValueError(f"a prompt line has neither `turns` nor `prompt`: {str(row)[:80]}")
        by_category.setdefault(category, []).append(text)
    wanted = {c: by_category.get(c, [])[:: max(1, len(by_category.get(c, [])) // per_category)][:per_category]
              for c in (categories or sorted(by_category))}
    missing = [c for c, texts in wanted.items() if not texts]
    if missing:
        raise ValueError(f"no prompts for categories {missing}; the file has {sorted(by_category)}")
    return wanted


@dataclass
class SessionTrace:
    opened_at: float
    events: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens) per cycle
    finish_reason: str | None = None


@dataclass
class Run:
    mode: str
    category: str
    batch_size: int
    tokens_per_verify_mean: float
    tokens_per_verify_std: float
    server_throughput_tok_s: float       # generated tokens per server busy second
    server_throughput_wall_tok_s: float  # generated tokens per wall second
    server_busy_s: float
    wall_s: float
    generated_tokens: int
    itl_ms_mean: float
    ttft_ms_mean: float
    cost_per_1k_tokens_usd: float
    proactive_hit_rate: float | None
    service_cpu_s: float = 0.0  # CPU time (user + system) of all services during the run
    verify_batch_mean: float = 0.0  # trees per verification pass


class Bench:
    """The deployment under test, and the runs made against it."""

    def __init__(self, settings: BenchSettings, nats_url: str, ids: dict[str, list[str]],
                 pids: Sequence[int] = ()) -> None:
        self.settings, self.nats_url, self.ids, self.pids = settings, nats_url, ids, list(pids)

    def cpu_s(self) -> float:
        """CPU seconds the services have used so far."""
        total = 0.0
        for pid in self.pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    async def stats(self, nc, role: str, instance: str, since: float = 0.0) -> ServiceStats:
        request = protocol.encode(StatsRequest(since=since))
        reply = await nc.request(subjects.stats(role, instance), request, timeout=10)
        return protocol.decode(reply.data, ServiceStats)

    async def snapshot(self, nc, since: float = 0.0) -> dict[str, ServiceStats]:
        out = {}
        for role, instances in self.ids.items():
            if role == "scheduler":
                continue
            for instance in instances:
                out[instance] = await self.stats(nc, "verifier" if role == "verifier" else "edge-agent", instance,
                                                 since)
        return out

    async def session(self, nc, tokens: list[int], mode: Mode, eos: list[int]) -> SessionTrace:
        sid = uuid.uuid4().hex
        sub = await nc.subscribe(subjects.session_tokens(sid))
        trace = SessionTrace(time.monotonic())
        request = SessionOpen(session_id=sid, tokens=tokens, max_new_tokens=self.settings.max_tokens, eos_ids=eos,
                              mode=mode, sampling=SamplingSpec())
        opened = protocol.decode((await nc.request(subjects.SESSIONS_OPEN, protocol.encode(request),
                                                   timeout=60)).data, SessionOpened)
        if opened.error:
            raise RuntimeError(f"session refused: {opened.error}")
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=120)
                except nats.errors.TimeoutError:
                    scheduler = await self.stats(nc, "scheduler", self.ids["scheduler"][0])
                    raise RuntimeError(f"session {sid[:12]} ({mode}) stalled after {len(trace.events)} cycles; "
                                       f"scheduler: {scheduler.counters}") from None
                event = protocol.decode(msg.data, TokenEvent)
                if event.error:
                    raise RuntimeError(f"session failed: {event.error}")
                trace.events.append((time.monotonic(), len(event.tokens)))
                if event.finished:
                    trace.finish_reason = event.finish_reason
                    return trace
        finally:
            await sub.unsubscribe()

    async def run(self, nc, mode: Mode, category: str, batch: int, prompts: list[list[int]], eos: list[int],
                  progress: tqdm) -> Run:
        before = await self.snapshot(nc, since=time.monotonic())
        cpu = self.cpu_s()
        started = time.monotonic()
        traces: list[SessionTrace] = []
        for i in range(0, len(prompts), batch):
            wave = prompts[i:i + batch]
            traces += await asyncio.gather(*(self.session(nc, p, mode, eos) for p in wave))
            progress.update(len(wave))
        wall = time.monotonic() - started
        cpu = self.cpu_s() - cpu
        after = await self.snapshot(nc, since=started)

        def delta(instance: str, counter: str) -> float:
            return after[instance].counters.get(counter, 0.0) - before[instance].counters.get(counter, 0.0)

        # Server busy: the union of the server side's forward passes in this run (verifier, and the
        # server drafter: they share a core, so their overlapping passes are counted once).
        server = [*self.ids["verifier"], *self.ids["server-drafter"]]
        busy = union_s([s for i in server for s in after[i].spans if started <= s[0] and s[1] <= started + wall])
        passes = sum(1 for i in self.ids["verifier"] for s in after[i].spans if started <= s[0] <= started + wall)
        hits = attempts = 0.0
        if mode == "specedge":
            hits = sum(delta(e, "proactive_hits") for e in self.ids["edge"])
            attempts = sum(delta(e, "proactive_attempts") for e in self.ids["edge"])
        per_cycle = [n for t in traces for n in self._cycles(t)]
        tokens = sum(n for t in traces for _, n in t.events)
        itls = [1000 * (t.events[-1][0] - t.events[0][0]) / (sum(n for _, n in t.events[1:]))
                for t in traces if len(t.events) > 1 and sum(n for _, n in t.events[1:])]
        edges_used = batch if mode == "specedge" else 0
        dollars = wall / 3600 * (self.settings.server_price_per_h + edges_used * self.settings.edge_price_per_h)
        return Run(
            mode=mode, category=category, batch_size=batch,
            tokens_per_verify_mean=statistics.fmean(per_cycle) if per_cycle else 0.0,
            tokens_per_verify_std=statistics.pstdev(per_cycle) if len(per_cycle) > 1 else 0.0,
            server_throughput_tok_s=tokens / busy if busy else 0.0,
            server_throughput_wall_tok_s=tokens / wall, server_busy_s=busy, wall_s=wall, generated_tokens=tokens,
            itl_ms_mean=statistics.fmean(itls) if itls else 0.0,
            ttft_ms_mean=1000 * statistics.fmean(t.events[0][0] - t.opened_at for t in traces),
            cost_per_1k_tokens_usd=1000 * dollars / max(tokens, 1),
            proactive_hit_rate=hits / attempts if attempts else (None if mode != "specedge" else 0.0),
            service_cpu_s=cpu, verify_batch_mean=sum(len(t.events) for t in traces) / passes if passes else 0.0)

    @staticmethod
    def _cycles(trace: SessionTrace) -> list[int]:
        """Tokens per verification: every cycle but a last one cut short by `max_tokens` or an end-of-turn."""
        counts = [n for _, n in trace.events]
        return counts[:-1] if trace.finish_reason in ("length", "stop") and len(counts) > 1 else counts



def _pin(pid: int, cores: list[int]) -> None:
    try:
        psutil.Process(pid).cpu_affinity(cores)
    except (psutil.Error, ValueError, AttributeError):  # not supported here: run unpinned
        log.debug("could not pin %d", pid)


def service_env(settings: BenchSettings) -> dict[str, str]:
    """The services' environment: ours, one torch thread each, quieter logs, the OTLP endpoint if given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "SPECEDGE_LOG_LEVEL": os.environ.get("SPECEDGE_BENCH_LOG_LEVEL", "warning")}
    if settings.otlp_endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = settings.otlp_endpoint
    return env


def tracing_of(env: dict[str, str]) -> str:
    """What the services do with spans under `env`: `off`, or the exporters and where OTLP goes."""
    names = telemetry.exporters(env)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return "off" if not names else ", ".join(f"{n} to {endpoint}" if n == "otlp" else n for n in names)


def deploy(launcher: Launcher, settings: BenchSettings) -> tuple[str, dict[str, list[str]], list[int]]:
    """Start servers and services; returns the NATS URL, instance ids by role, and the cores used."""
    nats, redis = launcher.start_nats(), launcher.start_redis()
    nats_url, redis_url = nats.url, redis.url
    cli = [sys.executable, "-m", "specedge.cli"]
    env = service_env(settings)
    edges = max(settings.batch_sizes)
    cores = sorted(os.sched_getaffinity(0))
    server_cores, edge_cores = (cores[:1], cores[1:]) if len(cores) > 1 else (cores, cores)
    common = ["--nats-url", nats_url]
    server = [
        launcher.spawn("verifier", [*cli, "verifier", *common, "--redis-url", redis_url, "--target", settings.target,
                                    "--max-sessions", str(edges + 2)], env=env),
        launcher.spawn("server-drafter", [*cli, "edge-agent", *common, "--draft", settings.draft, "--server-side",
                                          "--max-sessions", str(edges), "--name", "server-drafter"], env=env),
    ]
    others = [launcher.spawn("scheduler", [*cli, "scheduler", *common, "--redis-url", redis_url, "--max-batch",
                                           str(edges), "--budget", str(settings.budget), "--server-budget",
                                           str(settings.server_budget), "--depth",
                                           str(settings.depth), "--server-depth", str(settings.server_depth),
                                           "--strategy", settings.strategy], env=env)]
    wan = [sys.executable, "-m", "specedge_bench.wan", str(settings.rtt_ms)]  # the edge's link
    others += [launcher.spawn(f"edge-{i}", [*wan, "edge-agent", *common, "--draft", settings.draft, "--max-sessions",
                                            "1", "--name", f"edge-{i}"], env=env) for i in range(edges)]
    for child in server:
        _pin(child.process.pid, server_cores)
    for child in (*others, nats, redis):
        _pin(child.process.pid, edge_cores)
    if len(cores) > 1:  # this process (the clients) too: the server core is the server side's alone
        os.sched_setaffinity(0, edge_cores)
    pids = {child.process.pid: child.name for child in server + others}

    async def registered() -> dict[str, list[str]]:
        async with bus.connect(nats_url, "bench-probe", initial_timeout_s=10) as nc:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                found = await registry.discover(nc, wait_s=0.5)
                ids: dict[str, list[str]] = {"verifier": [], "server-drafter": [], "edge": [], "scheduler": []}
                for a in found:
                    name = next((n for pid, n in pids.items() if f"-{pid}-" in a.instance_id), None)
                    role = {"verifier": "verifier", "server-drafter": "server-drafter",
                            "scheduler": "scheduler"}.get(name or "", "edge" if name else None)
                    if role:
                        ids[role].append(a.instance_id)
                if len(ids["edge"]) == edges and all(ids[r] for r in ("verifier", "server-drafter", "scheduler")):
                    await asyncio.sleep(2.5)  # the scheduler hears every heartbeat
                    return ids
                if any(not c.alive() for c in server + others):
                    raise RuntimeError("a service exited during startup")
            raise TimeoutError("services did not register within 180 s")

    return nats_url, asyncio.run(registered()), cores


def report_table(runs: list[Run], settings: BenchSettings) -> str:
    base = {(r.category, r.batch_size): r for r in runs if r.mode == "server-only"}
    lines = ["| category | batch | mode | tokens/verify | server tok/s (busy) | × server-only | server tok/s (wall) "
             "| 1k tok/$ | ITL ms | TTFT ms | proactive hits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r.category, r.batch_size, MODES.index(r.mode))):
        ref = base.get((r.category, r.batch_size))
        ratio = f"{r.server_throughput_tok_s / ref.server_throughput_tok_s:.2f}×" if ref else "–"
        hits = "–" if r.proactive_hit_rate is None else f"{r.proactive_hit_rate:.2f}"
        lines.append(f"| {r.category} | {r.batch_size} | {r.mode} | {r.tokens_per_verify_mean:.2f} ± "
                     f"{r.tokens_per_verify_std:.2f} | {r.server_throughput_tok_s:.1f} | {ratio} | "
                     f"{r.server_throughput_wall_tok_s:.1f} | {1 / max(r.cost_per_1k_tokens_usd, 1e-12):.1f} | "
                     f"{r.itl_ms_mean:.1f} | {r.ttft_ms_mean:.0f} | {hits} |")
    return "\n".join(lines)


def summary_table(runs: list[Run]) -> str:
    """Per mode and batch size, over categories: the ratios the issue's goals are about."""
    lines = ["| batch | mode | tokens/verify | server tok/s (busy) | × server-only | ITL ms | × server-only ITL "
             "| trees/pass |", "|---|---|---|---|---|---|---|---|"]
    for batch in sorted({r.batch_size for r in runs}):
        rows = {m: [r for r in runs if r.batch_size == batch and r.mode == m] for m in MODES}
        base = rows.get("server-only") or []

        def mean(rs, attr):
            return statistics.fmean(getattr(r, attr) for r in rs) if rs else float("nan")

        for mode in MODES:
            if not rows[mode]:
                continue
            thr, itl = mean(rows[mode], "server_throughput_tok_s"), mean(rows[mode], "itl_ms_mean")
            lines.append(f"| {batch} | {mode} | {mean(rows[mode], 'tokens_per_verify_mean'):.2f} | {thr:.1f} | "
                         f"{_ratio(thr, mean(base, 'server_throughput_tok_s'))} | {itl:.1f} | "
                         f"{_ratio(itl, mean(base, 'itl_ms_mean'))} | {mean(rows[mode], 'verify_batch_mean'):.2f} |")
    return "\n".join(lines)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base and not math.isnan(base) else "—"


def plots(runs: list[Run], timeline: dict[str, list[list[float]]], out: Path) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written = []
    for attr, label, name in (("cost_per_1k_tokens_usd", "cost per 1k tokens (USD)", "cost_vs_batch.png"),
                              ("itl_ms_mean", "inter-token latency (ms)", "itl_vs_batch.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in MODES:
            rows = [r for r in runs if r.mode == mode]
            sizes = sorted({r.batch_size for r in rows})
            if sizes:
                ax.plot(sizes, [statistics.fmean(getattr(r, attr) for r in rows if r.batch_size == b) for b in sizes],
                        marker="o", label=mode)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    if timeline:
        fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(timeline)))
        origin = min(s[0] for spans in timeline.values() for s in spans)
        for row, (name, spans) in enumerate(timeline.items()):
            ax.broken_barh([(1000 * (a - origin), 1000 * (b - a)) for a, b in spans], (row - 0.35, 0.7),
                           color="tab:red" if name == "verifier" else "tab:blue")
        ax.set_yticks(range(len(timeline)), list(timeline))
        ax.set_xlabel("ms (verifier: verification passes; edges: drafting, proactive included)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "timeline.png", dpi=110)
        plt.close(fig)
        written.append("timeline.png")
    return written


def _window(stats: dict[str, ServiceStats], ids: dict[str, list[str]], cycles: int = 6) -> dict[str, list[list[float]]]:
    """The last few verification passes and the edges' drafting around them."""
    passes = stats[ids["verifier"][0]].spans[-cycles:]
    if not passes:
        return {}
    start, end = passes[0][0] - 0.01, passes[-1][1]
    rows = {"verifier": passes}
    for i, edge in enumerate(ids["edge"]):
        spans = [s for s in stats[edge].spans if s[1] >= start and s[0] <= end]
        if spans:
            rows[f"edge {i + 1}"] = spans
    return rows


def run_bench(settings: BenchSettings) -> int:
    from transformers import AutoTokenizer, GenerationConfig  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    categories = settings.categories or (CATEGORIES if settings.prompts is None else ())
    prompts = load_prompts(settings.prompts, categories, settings.num_prompts)
    tok = AutoTokenizer.from_pretrained(settings.target)
    encoded = {c: [chat_prompt_ids(tok, t) for t in texts] for c, texts in prompts.items()}
    eos_ids = GenerationConfig.from_pretrained(settings.target).eos_token_id
    eos = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    settings.out.mkdir(parents=True, exist_ok=True)
    total = len(settings.batch_sizes) * len(settings.modes) * sum(len(p) for p in encoded.values())
    runs: list[Run] = []
    timeline: dict[str, list[list[float]]] = {}
    started = time.monotonic()
    with Launcher() as launcher:
        log.info("starting nats-server, redis-server and %d services", 3 + max(settings.batch_sizes))
        nats_url, ids, cores = deploy(launcher, settings)
        bench = Bench(settings, nats_url, ids, [c.pid for c in launcher.children
                                                if c.name not in ("nats-server", "redis-server")])

        async def everything() -> None:
            nonlocal timeline
            async with bus.connect(nats_url, "bench") as nc:
                with tqdm(total=total, desc="sessions", unit="session", file=sys.stderr) as progress:
                    for batch in settings.batch_sizes:
                        for category, items in encoded.items():
                            for mode in settings.modes:  # interleaved: machine noise hits every mode alike
                                runs.append(await bench.run(nc, mode, category, batch, items, eos, progress))
                                if mode == "specedge" and batch == max(settings.batch_sizes):
                                    timeline = _window(await bench.snapshot(nc, time.monotonic() - 30), ids)

        asyncio.run(everything())
    written = plots(runs, timeline, settings.out)
    settings_out = {**settings.model_dump(mode="json"), "cores": len(cores),
                    "pinning": "server side on core 0, edges and the rest on the others" if len(cores) > 1
                    else "none (one core)", "throughput_in_table": "generated tokens per server busy second",
                    "tracing": tracing_of(service_env(settings))}
    (settings.out / "results.json").write_text(json.dumps({"settings": settings_out,
                                                           "runs": [asdict(r) for r in runs]}, indent=2))
    command = "specedge bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "specedge bench"
    report = [f"# specedge bench — {time.strftime('%Y-%m-%d')}", "", f"Command: `{command}`", "",
              f"{sum(len(p) for p in encoded.values())} prompts ({', '.join(encoded)}), {settings.max_tokens} new "
              f"tokens, greedy, tree budget {settings.budget} (server-only: "
              f"{settings.server_budget}, as the paper's baseline) depth {settings.depth} (server-only: "
              f"{settings.server_depth}), "
              f"emulated RTT {settings.rtt_ms} ms, scheduling strategy {settings.strategy}, "
              f"{len(cores)} cores ({settings_out['pinning']}); tracing {settings_out['tracing']}; "
              f"{time.monotonic() - started:.0f} s.",
              "*Server tok/s (busy)* = generated tokens per second of server work (verification passes, plus "
              "the server drafter's drafting in server-only mode); *(wall)* per second of the run.", "",
              "## Summary over categories", "", summary_table(runs), "", "## By category", "",
              report_table(runs, settings), "", "## Plots", "", *(f"![{p}]({p})" for p in written), ""]
    (settings.out / "report.md").write_text("\n".join(report))
    sys.stdout.write(f"wrote {settings.out}/results.json, report.md, {', '.join(written)}\n\n"
                     + summary_table(runs) + "\n")
    return 0
