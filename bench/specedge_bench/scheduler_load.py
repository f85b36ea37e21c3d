"""Can one scheduler keep up with 1000 edges? A load generator over real NATS.

Starts real nats-server and redis-server and the real `specedge scheduler` process pinned
to one CPU core; this process plays everything else on the other core(s): `--edges` fake
edge agents (announced on the registry, one session each, each answering every result
with its next draft at once: a closed loop with no drafting time), `--verifiers` stub
verifiers (they register, prefill instantly and answer every batch with one accepted
token per tree, no model), and the gateway side (it opens the sessions and counts
token events). It reports drafts per second through the scheduler, the batch sizes it
formed, the time from a draft leaving an edge to its result coming back (p50/p99), and
whether anything arrived out of order. `--think-ms T` makes each edge wait T ms after a
result before its next draft (its drafting time): an offered load of edges / T drafts
per second, at which a scheduler that keeps up shows a flat, small round trip.

    python -m specedge_bench.scheduler_load --edges 1000 --seconds 10 [--think-ms 80]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
import uuid

import psutil

from specedge import bus, protocol, registry, subjects
from specedge.launcher import Launcher
from specedge.protocol import (
    DraftAssign,
    DraftTreeMsg,
    PrefillReply,
    PrefillRequest,
    ServiceAnnouncement,
    SessionOpen,
    SessionOpened,
    TokenEvent,
    VerifyBatchReply,
    VerifyBatchRequest,
    VerifyResult,
)

log = logging.getLogger("specedge.bench_load")
FINGERPRINT = "bench0000000000"


class Load:
    """Counters of the run."""

    def __init__(self) -> None:
        self.drafts_sent = 0
        self.results = 0
        self.token_events = 0
        self.batches: list[int] = []
        self.out_of_order = 0
        self.measuring = False
        self.round_trips: list[float] = []


async def stub_verifier(nc, instance: str, load: Load) -> None:
    async def on_prefill(msg) -> None:
        request = protocol.decode(msg.data, PrefillRequest)
        await msg.respond(protocol.encode(PrefillReply(session_id=request.session_id,
                                                       committed_len=len(request.tokens))))

    async def on_verify(msg) -> None:
        request = protocol.decode(msg.data, VerifyBatchRequest)
        results = [VerifyResult(session_id=t.session_id, cycle=t.cycle, committed_len=t.committed_len,
                                accepted=t.tokens[:1], bonus=7) for t in request.trees]
        if load.measuring:
            load.batches.append(len(results))
        await msg.respond(protocol.encode(VerifyBatchReply(batch_id=request.batch_id, results=results)))

    await nc.subscribe(subjects.verifier_prefill(instance), cb=on_prefill)
    await nc.subscribe(subjects.verifier_verify(instance), cb=on_verify)


async def run(nats_url: str, edges: int, verifiers: int, seconds: float, nodes: int, think_s: float) -> dict:
    load = Load()
    async with bus.connect(nats_url, "bench-load") as nc:
        announcements = []
        for _ in range(verifiers):
            ann = registry.announcement("verifier", None, 1.0, max_sessions=str(edges),
                                        tokenizer_fingerprint=FINGERPRINT)
            await stub_verifier(nc, ann.instance_id, load)
            announcements.append(ann)
        edge_ids = [registry.new_instance_id("edge-agent") for _ in range(edges)]
        for edge in edge_ids:
            announcements.append(ServiceAnnouncement(role="edge-agent", instance_id=edge, name=edge, version="bench",
                                                     heartbeat_s=1.0, details={"max_sessions": "1", "pool": "shared",
                                                                               "tokenizer_fingerprint": FINGERPRINT}))
        sessions: dict[str, tuple[str, str]] = {}  # sid -> (edge, scheduler)
        sent_at: dict[str, float] = {}
        loop, tasks = asyncio.get_running_loop(), set()
        expected_index: dict[str, int] = {}
        tree_tokens = list(range(1, nodes + 1))
        tree_parents = [-1, *range(nodes - 1)]

        async def send(sid: str, cycle: int, committed_len: int) -> None:
            edge, scheduler = sessions[sid]
            tree = DraftTreeMsg(session_id=sid, cycle=cycle, committed_len=committed_len, tokens=tree_tokens,
                                parents=tree_parents)
            sent_at[sid] = time.perf_counter()
            await nc.publish(subjects.drafts(edge, scheduler), protocol.encode(tree))
            if load.measuring:
                load.drafts_sent += 1

        async def on_assign(msg) -> None:
            assign = protocol.decode(msg.data, DraftAssign)
            sessions[assign.session_id] = (msg.subject.split(".")[3], assign.scheduler)
            await send(assign.session_id, 0, len(assign.tokens))

        async def on_result(msg) -> None:
            result = protocol.decode(msg.data, VerifyResult)
            if load.measuring:
                load.results += 1
                load.round_trips.append(time.perf_counter() - sent_at[result.session_id])
            args = (result.session_id, result.cycle + 1, result.committed_len + len(result.accepted) + 1)
            if think_s:  # drafting, off the callback: other results keep flowing meanwhile
                loop.call_later(think_s, lambda: _track(tasks, asyncio.ensure_future(send(*args))))
            else:
                await send(*args)

        async def on_tokens(msg) -> None:
            event = protocol.decode(msg.data, TokenEvent)
            if event.index != expected_index.get(event.session_id, 0):
                load.out_of_order += 1
            expected_index[event.session_id] = event.index + len(event.tokens)
            if load.measuring:
                load.token_events += 1

        await nc.subscribe(f"{subjects.PREFIX}.edge.*.assign", cb=on_assign)
        await nc.subscribe(f"{subjects.PREFIX}.edge.*.result", cb=on_result)
        await nc.subscribe(f"{subjects.PREFIX}.session.*.tokens", cb=on_tokens)

        async def heartbeat() -> None:
            while True:
                for ann in announcements:
                    await nc.publish(registry.announce_subject(ann), protocol.encode(ann))
                await asyncio.sleep(0.5)

        beats = asyncio.create_task(heartbeat())
        await asyncio.sleep(2.0)  # the scheduler hears every edge and verifier
        opened = await asyncio.gather(*(nc.request(subjects.SESSIONS_OPEN, protocol.encode(SessionOpen(
            session_id=uuid.uuid4().hex, tokens=[1, 2, 3], max_new_tokens=10**9)), timeout=60) for _ in range(edges)))
        errors = [r.error for r in (protocol.decode(m.data, SessionOpened) for m in opened) if r.error]
        with_edge = sum(1 for m in opened if protocol.decode(m.data, SessionOpened).edge)
        await asyncio.sleep(2.0)  # warm up
        load.measuring = True
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        load.measuring = False
        elapsed = time.perf_counter() - started
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
    return {"edges": edges, "sessions_with_an_edge": with_edge, "open_errors": len(errors),
            "drafts_per_s": load.drafts_sent / elapsed, "results_per_s": load.results / elapsed,
            "token_events_per_s": load.token_events / elapsed, "mean_batch": statistics.fmean(load.batches or [0]),
            "batches_per_s": len(load.batches) / elapsed, "out_of_order": load.out_of_order,
            "round_trip_ms_p50": 1000 * _percentile(load.round_trips, 0.5),
            "round_trip_ms_p99": 1000 * _percentile(load.round_trips, 0.99)}


def _track(tasks: set, task: asyncio.Future) -> None:
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=1000)
    parser.add_argument("--verifiers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, default=32, help="tree nodes per draft")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--think-ms", type=float, default=0.0, help="each edge's pause between result and draft")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with Launcher() as launcher:
        nats_url, redis_url = launcher.start_nats().url, launcher.start_redis().url
        scheduler = launcher.spawn("scheduler", [sys.executable, "-m", "specedge.cli", "scheduler", "--nats-url",
                                                 nats_url, "--redis-url", redis_url, "--max-batch",
                                                 str(args.max_batch), "--strategy", "fifo",
                                                 "--log-level", "warning"])
        cores = sorted(os.sched_getaffinity(0))
        psutil.Process(scheduler.process.pid).cpu_affinity(cores[:1])  # the scheduler gets one core
        if len(cores) > 1:
            os.sched_setaffinity(0, cores[1:])  # everything else stays off it
        deadline = time.monotonic() + 60
        while not any(a.role == "scheduler" for a in asyncio.run(_discover(nats_url))):
            if time.monotonic() > deadline:
                raise SystemExit("the scheduler did not come up")
        cpu_before = psutil.Process(scheduler.process.pid).cpu_times()
        report = asyncio.run(run(nats_url, args.edges, args.verifiers, args.seconds, args.nodes,
                                 args.think_ms / 1000))
        cpu_after = psutil.Process(scheduler.process.pid).cpu_times()
        busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        report["scheduler_cpu_s"] = round(busy, 2)
    sys.stdout.write("\n".join(f"{k}: {round(v, 2) if isinstance(v, float) else v}" for k, v in report.items())
                     + "\n")
    return 0


async def _discover(nats_url: str) -> list[ServiceAnnouncement]:
    async with bus.connect(nats_url, "bench-load-probe") as nc:
        return await registry.discover(nc, wait_s=0.3)


if __name__ == "__main__":
    raise SystemExit(main())
