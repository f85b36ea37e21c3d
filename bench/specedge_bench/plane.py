"""Measure the message plane: per-cycle overhead and end-to-end tokens/s of the services.

    python -m specedge_bench.plane [--num-prompts 10] [--max-tokens 64]

Starts real nats-server and redis-server, a verifier and a scheduler as processes, and an
edge agent's service (`edge_agent.handlers.EdgeService`) in this process so that its clock
times every cycle: from a tree leaving the edge to its result arriving back, minus the
verifier's forward pass, is the overhead of the message plane (NATS hops, the scheduler,
encoding, validation). Sessions are opened on the bus as the gateway does, one at a time,
greedy; the same prompts then run in process (`specedge` mode) for comparison. It lives
here because the edge's clock is the one that times a cycle.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid

from edge_agent.handlers import EdgeService
from specedge import bus, protocol, registry, subjects
from specedge.engine.generate import generate
from specedge.engine.loading import load_causal_lm
from specedge.engine.parties import Drafter, Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import TreeParams
from specedge.launcher import Launcher
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled, chat_prompt_ids
from specedge.protocol import SessionOpen, SessionOpened, TokenEvent
from specedge_bench.modes import load_prompts

log = logging.getLogger("specedge.bench_plane")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def over_the_bus(nats_url: str, prompts: list[list[int]], max_tokens: int, eos: list[int]):
    draft = load_causal_lm(bundled(BUNDLED_DRAFT))
    async with bus.connect(nats_url, "bench-plane") as nc:
        me = registry.announcement("edge-agent", "bench-edge", heartbeat_s=1.0, max_sessions="4",
                                   **draft.registry_details())
        edge = EdgeService(nc, me.instance_id, Drafter(draft.model, TreeParams(), max_sessions=4, max_len=4096))
        await edge.subscribe()
        async with registry.presence(nc, me):
            deadline = time.monotonic() + 120
            while not {a.role for a in await registry.discover(nc)} >= {"verifier", "scheduler"}:
                if time.monotonic() > deadline:
                    raise RuntimeError("the verifier and scheduler did not come up")
            await asyncio.sleep(2.5)  # the scheduler hears our heartbeat
            tokens, started = 0, time.perf_counter()
            for ids in prompts:
                sid = uuid.uuid4().hex
                sub = await nc.subscribe(subjects.session_tokens(sid))
                request = SessionOpen(session_id=sid, tokens=ids, max_new_tokens=max_tokens, eos_ids=eos)
                reply = protocol.decode((await nc.request(subjects.SESSIONS_OPEN, protocol.encode(request),
                                                          timeout=30)).data, SessionOpened)
                if reply.error or reply.edge != me.instance_id:
                    raise RuntimeError(f"session not drafted by the bench edge: {reply}")
                while True:
                    event = protocol.decode((await sub.next_msg(timeout=60)).data, TokenEvent)
                    tokens += len(event.tokens)
                    if event.finished:
                        break
                await sub.unsubscribe()
            elapsed = time.perf_counter() - started
    return tokens / elapsed, list(edge.round_trips)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", default="")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    target = load_causal_lm(bundled(BUNDLED_TARGET))
    tok = target.tokenizer
    texts = load_prompts(None, [c for c in args.categories.split(",") if c], args.num_prompts)
    prompts = [chat_prompt_ids(tok, t) for t in texts]
    eos = list(target.model.generation_config.eos_token_id)

    with Launcher() as launcher:
        nats_url, redis_url = launcher.start_nats().url, launcher.start_redis().url
        cli = [sys.executable, "-m", "specedge.cli"]
        for role in ("verifier", "scheduler"):
            launcher.spawn(role, [*cli, role, "--nats-url", nats_url, "--redis-url", redis_url,
                                  "--log-level", "warning"])
        bus_rate, trips = asyncio.run(over_the_bus(nats_url, prompts, args.max_tokens, eos))

    verifier = Verifier(target.model, max_sessions=1)
    drafter = Drafter(load_causal_lm(bundled(BUNDLED_DRAFT)).model, TreeParams(), max_sessions=1)
    tokens, started = 0, time.perf_counter()
    for ids in prompts:
        tokens += len(generate("specedge", verifier, drafter, ids, SamplingSpec(), args.max_tokens,
                               set(eos)).token_ids)
    in_process = tokens / (time.perf_counter() - started)

    overhead = [rtt - verify for rtt, verify in trips]
    rtts = [rtt for rtt, _ in trips]
    lines = [
        f"{len(prompts)} prompts, {args.max_tokens} new tokens, greedy, one session at a time; "
        f"{len(trips)} draft–verify cycles over loopback NATS",
        "",
        "| measure | p50 | p99 | mean |",
        "|---|---|---|---|",
        f"| message-plane overhead per cycle, ms | {percentile(overhead, 0.5):.2f} | "
        f"{percentile(overhead, 0.99):.2f} | {statistics.fmean(overhead):.2f} |",
        f"| edge round trip per cycle (incl. verification), ms | {percentile(rtts, 0.5):.2f} | "
        f"{percentile(rtts, 0.99):.2f} | {statistics.fmean(rtts):.2f} |",
        "",
        "| path | tokens/s |",
        "|---|---|",
        f"| services over NATS (scheduler, verifier processes; edge in the bench process) | {bus_rate:.1f} |",
        f"| in process, `specedge` mode | {in_process:.1f} |",
        f"| ratio services / in-process | {bus_rate / in_process:.2f}× |",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
