"""The server side at fleet scale, simulated: thousands of edges, several schedulers and verifiers.

    python -m specedge_bench.fleet --edges 10000 --verifiers 1,2,4,8 --schedulers 4

Each scheduler is the live scheduler's core (`specedge_scheduler.core.SchedulerCore`),
fed the events it gets in production. A scheduler is a single-threaded server: each draft
keeps it busy for the CPU a draft costs the live scheduler process — its whole cycle: the
draft in, its share of a batch out, the result and tokens out, over NATS and asyncio
(`LIVE_CPU_PER_DRAFT_S`, measured with `scheduler_load`) — so a scheduler that cannot keep
up delays the drafts and results behind it as a live one would. The core's own CPU time
per draft (what `handle` took here) is reported beside it. A verifier is
a FIFO server too: batches from every scheduler wait their turn, each taking
`verify_base_s + verify_per_node_s × nodes` of the preset. Edges draft with the preset's
timing and acceptance model (`simulator`) and talk to their scheduler across half a round
trip each way.

Every run keeps the edges per verifier fixed (`--edges` at the largest verifier count), so
the question is whether server throughput grows in proportion to the verifiers. Sessions
(one per edge) open round robin over the schedulers, as their queue group would deal them;
each scheduler is told about its share of the edges (edge capacity is tracked per
scheduler) and about every verifier. `docs/benchmarks.md` records the results.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from specedge import protocol, registry, subjects
from specedge.protocol import (
    TREE_BEAMS,
    TREE_BRANCH,
    DraftAssign,
    SamplingSpec,
    SessionOpen,
    TokenEvent,
    VerifyResult,
)
from specedge_bench.simulator import PRESETS, PROMPT_TOKENS, Preset, _Edge, verified_reply
from specedge_scheduler.core import SchedulerCore
from specedge_scheduler.events import (
    BatchVerified,
    CreateSession,
    Discovered,
    DraftReceived,
    Listen,
    Listening,
    OpenRequested,
    Prefilled,
    Publish,
    Tick,
    Verify,
)
from specedge_scheduler.guard import EdgeGuard, GuardLimits
from specedge_scheduler.policy import SchedulingPolicy

# `scheduler_load --edges 1000` (docs/benchmarks.md, "One scheduler, 1000 edges", closed
# loop): 17.43 CPU seconds for 21,873 drafts/s over its ~14 s run.
LIVE_CPU_PER_DRAFT_S = 17.43 / (21_873 * 14)


@dataclass
class FleetResult:
    verifiers: int
    schedulers: int
    edges: int
    sim_s: float
    throughput_tok_s: float  # generated tokens per wall second, over every verifier
    verifier_utilization: float  # mean busy share of the verifiers
    scheduler_utilization: float  # busiest scheduler's busy share (drafts × the live CPU per draft / wall)
    scheduler_cpu_per_draft_us: float  # the live scheduler's CPU per draft, as modelled
    core_cpu_per_draft_us: float  # mean CPU time of the core's `handle` on a draft, measured here
    tokens_per_verify: float
    mean_batch: float
    itl_ms: float
    wall_s: float  # how long the simulation took on this machine


def simulate_fleet(preset: Preset, verifiers: int, schedulers: int, edges: int, sim_s: float = 10.0,
                   max_batch: int = 128, strategy: str = "pipeline", seed: int = 0,
                   cpu_per_draft_s: float = LIVE_CPU_PER_DRAFT_S) -> FleetResult:
    rng = random.Random(seed)
    started_wall = time.perf_counter()
    cores = [SchedulerCore(f"sched-{i}", SchedulingPolicy(
        max_batch=max_batch, strategy=strategy, budget=preset.budget, depth=preset.depth, edge_timeout_s=1e9,
        verifier_timeout_s=1e9, draft_timeout_s=1e9), {"budget": preset.budget, "depth": preset.depth,
                                                       "branch": TREE_BRANCH, "beams": TREE_BEAMS},
        heartbeat_s=1e9, guard=EdgeGuard(GuardLimits(drafts_per_s=1e9))) for i in range(schedulers)]
    fleet = {f"e{i}": _Edge(f"e{i}") for i in range(edges)}
    scheduler_of_edge = {name: i % schedulers for i, name in enumerate(fleet)}
    scheduler_of_session: dict[str, int] = {}
    edge_of_session: dict[str, _Edge] = {}
    events: list[tuple[float, int, str, object]] = []
    order = itertools.count()
    inbox: list[collections.deque] = [collections.deque() for _ in cores]  # events waiting for their scheduler
    busy_until = [0.0] * schedulers
    tick_queued = [False] * schedulers
    busy_s, draft_cpu = [0.0] * schedulers, []
    verifier_free = dict.fromkeys((f"v{i}" for i in range(verifiers)), 0.0)
    verifier_busy = dict.fromkeys(verifier_free, 0.0)
    warm_from = 0.2 * sim_s
    tokens, samples, batches, itls = 0, [], [], []

    def at(t: float, kind: str, payload: object) -> None:
        heapq.heappush(events, (t, next(order), kind, payload))

    def one_way() -> float:
        return preset.rtt_s / 2 * rng.lognormvariate(0, preset.rtt_jitter)

    def to_scheduler(s: int, event: object, t: float) -> None:
        inbox[s].append(event)
        if len(inbox[s]) == 1:  # (else a run is due already)
            at(max(t, busy_until[s]), "run", s)

    def run(s: int, now: float) -> None:
        """The scheduler handles its next event; it is busy for the CPU time that took."""
        if busy_until[s] > now or not inbox[s]:
            return
        event = inbox[s].popleft()
        if isinstance(event, Tick):
            tick_queued[s] = False
        measured = time.perf_counter()
        commands = cores[s].handle(event, now)
        measured = time.perf_counter() - measured
        cpu = 0.0
        if isinstance(event, DraftReceived):
            draft_cpu.append(measured)
            cpu = cpu_per_draft_s
        if now > warm_from:
            busy_s[s] += cpu
        done = now + cpu
        busy_until[s] = done
        execute(s, commands, done)
        if not isinstance(event, Tick) and not tick_queued[s]:
            tick_queued[s] = True
            inbox[s].append(Tick())
        if inbox[s]:
            at(done, "run", s)
        elif isinstance(event, Tick):
            at(max(cores[s].wake_at, done), "wake", s)

    def execute(s: int, commands: list, now: float) -> None:
        nonlocal tokens
        for command in commands:
            if isinstance(command, Verify):
                nodes = sum(len(t.tokens) + 1 for t in command.trees)
                seconds = (preset.verify_base_s + preset.verify_per_node_s * nodes) * rng.lognormvariate(0, 0.03)
                start = max(now, verifier_free[command.verifier])
                verifier_free[command.verifier] = start + seconds
                if start > warm_from:
                    verifier_busy[command.verifier] += max(0.0, min(seconds, sim_s - start))
                    batches.append(len(command.trees))
                at(start + seconds, "verified", (s, command, seconds))
            elif isinstance(command, Listen):
                inbox[s].append(Listening(command.edge, command.announcement))
            elif isinstance(command, CreateSession):
                inbox[s].append(Prefilled(command.request.session_id, None))
            elif isinstance(command, Publish) and isinstance(command.message, DraftAssign | VerifyResult):
                at(now + one_way(), "to_edge", (fleet[command.subject.split(".")[-2]], command.message))
            elif isinstance(command, Publish) and isinstance(command.message, TokenEvent) and now > warm_from:
                tokens += len(command.message.tokens)

    def send_draft(edge: _Edge, now: float, elapsed_waiting: float, hit: bool) -> None:
        draft_s, data = edge.draft(preset, elapsed_waiting, hit)
        at(now + draft_s + one_way(), "draft", (edge, data))

    for s, core in enumerate(cores):
        for v in verifier_free:
            execute(s, core.handle(Discovered(registry.announcement(
                "verifier", instance_id=v, max_sessions=str(2 * edges // verifiers + 16))), 0.0), 0.0)
    for name, s in scheduler_of_edge.items():
        commands = cores[s].handle(Discovered(registry.announcement(
            "edge-agent", instance_id=name, max_sessions="1", pool="shared")), 0.0)
        for listen in commands:
            if isinstance(listen, Listen):
                cores[s].handle(Listening(listen.edge, listen.announcement), 0.0)
    for i in range(edges):  # prompts arrive over the first tenth of the run
        sid = f"s{i}"
        scheduler_of_session[sid] = i % schedulers
        request = SessionOpen(session_id=sid, tokens=[0] * PROMPT_TOKENS, sampling=SamplingSpec(),
                              max_new_tokens=10**9)
        at(rng.uniform(0, 0.1 * sim_s), "open", (i % schedulers, request))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if now > sim_s:
            break
        if kind == "run":
            run(payload, now)
        elif kind == "wake":
            if not inbox[payload] and not tick_queued[payload]:
                tick_queued[payload] = True
                to_scheduler(payload, Tick(), now)
        elif kind == "open":
            s, request = payload
            to_scheduler(s, OpenRequested(protocol.encode(request), ""), now)
        elif kind == "draft":
            edge, data = payload
            edge.sent_at = now
            to_scheduler(scheduler_of_session[edge.sid], DraftReceived(
                subjects.drafts(edge.name, cores[scheduler_of_session[edge.sid]].instance_id), data), now)
        elif kind == "verified":
            s, command, seconds = payload
            reply = verified_reply(preset, rng, command.trees, {t.session_id: edge_of_session[t.session_id].depth
                                                                for t in command.trees}, seconds)
            if now > warm_from:
                samples += [len(r.accepted) + 1 for r in reply.results]
            to_scheduler(s, BatchVerified(command.verifier, command.trees, reply), now)
        elif kind == "to_edge":
            edge, message = payload
            if isinstance(message, DraftAssign):
                edge_of_session[message.session_id] = edge
                edge.follow(message)
                send_draft(edge, now, 0.0, hit=False)
            else:
                if now > warm_from and edge.last_result_at is not None:
                    itls.append((now - edge.last_result_at) / (len(message.accepted) + 1))
                edge.last_result_at = now
                edge.follow(message)
                send_draft(edge, now, now - edge.sent_at, rng.random() < preset.proactive_hit_rate)
    window = sim_s - warm_from
    return FleetResult(
        verifiers=verifiers, schedulers=schedulers, edges=edges, sim_s=sim_s, throughput_tok_s=tokens / window,
        verifier_utilization=statistics.fmean(verifier_busy.values()) / window,
        scheduler_utilization=max(busy_s) / window,
        scheduler_cpu_per_draft_us=1e6 * cpu_per_draft_s,
        core_cpu_per_draft_us=1e6 * statistics.fmean(draft_cpu) if draft_cpu else 0.0,
        tokens_per_verify=statistics.fmean(samples) if samples else 0.0,
        mean_batch=statistics.fmean(batches) if batches else 0.0,
        itl_ms=1000 * statistics.fmean(itls) if itls else 0.0, wall_s=time.perf_counter() - started_wall)


def table(runs: list[FleetResult]) -> str:
    """A Markdown table; `× linear` is throughput over (verifiers × the one-verifier run's)."""
    one = runs[0].throughput_tok_s / runs[0].verifiers
    lines = ["| verifiers | schedulers | edges | tok/s | × linear | verifier util. | busiest scheduler | "
             "scheduler CPU/draft (core alone) | tokens/verify | batch | ITL ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.verifiers} | {r.schedulers} | {r.edges} | {r.throughput_tok_s:.0f} | "
                     f"{r.throughput_tok_s / (one * r.verifiers):.2f} | {r.verifier_utilization:.1%} | "
                     f"{r.scheduler_utilization:.1%} | {r.scheduler_cpu_per_draft_us:.0f} µs "
                     f"({r.core_cpu_per_draft_us:.0f} µs) | "
                     f"{r.tokens_per_verify:.2f} | {r.mean_batch:.1f} | {r.itl_ms:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper-14b-0.6b", choices=sorted(PRESETS))
    parser.add_argument("--edges", type=int, default=10_000, help="edges at the largest verifier count")
    parser.add_argument("--verifiers", default="1,2,4,8")
    parser.add_argument("--schedulers", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--scheduler-cpu-per-draft-us", type=float, default=1e6 * LIVE_CPU_PER_DRAFT_S,
                        help="the live scheduler's CPU per draft (default: measured, see LIVE_CPU_PER_DRAFT_S)")
    parser.add_argument("--sim-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = parser.parse_args(argv)
    counts = [int(v) for v in args.verifiers.split(",")]
    per_verifier = args.edges // max(counts)
    runs = []
    for v in counts:
        runs.append(simulate_fleet(PRESETS[args.preset], v, args.schedulers, per_verifier * v, args.sim_seconds,
                                   args.max_batch, seed=args.seed,
                                   cpu_per_draft_s=args.scheduler_cpu_per_draft_us / 1e6))
        sys.stderr.write(f"{v} verifier(s), {per_verifier * v} edges: {runs[-1].throughput_tok_s:.0f} tok/s "
                         f"(simulated in {runs[-1].wall_s:.0f}s)\n")
    if args.json:
        sys.stdout.write("".join(json.dumps(asdict(r)) + "\n" for r in runs))
    else:
        sys.stdout.write(table(runs) + "\n")


if __name__ == "__main__":
    main()
