"""Scheduler, verifier and edge agent as real processes over real NATS: a session opened
on the bus streams exactly the target's greedy output, and survives its edge being killed."""

import asyncio
import signal
import time
import uuid

import nats
import pytest

from specedge import protocol, subjects
from specedge.protocol import ServiceStats, SessionOpen
from tests.helpers import registered, schedulers_know, start_cli, wait_for
from tests.sessions import collect, open_session, prompt_and_reference


@pytest.fixture
def stack(nats_url, redis_url, cli_env, tmp_path):
    procs = {
        "verifier": start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "1024"],
                              cli_env, tmp_path / "verifier.log"),
        "edge-agent": start_cli(["edge-agent", "--nats-url", nats_url, "--max-len", "1024"], cli_env,
                                tmp_path / "edge.log"),
        "scheduler": start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url,
                                "--budget", "16", "--depth", "3"], cli_env, tmp_path / "scheduler.log"),
    }
    for role, proc in procs.items():
        wait_for(lambda r=role, p=proc: registered(nats_url, r, p.pid), 60, role)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()


async def test_a_session_streams_exactly_the_target_output(stack, nats_url):
    ids, reference, eos = prompt_and_reference("Write a function that merges two sorted lists.", 48)
    nc = await nats.connect(nats_url)
    sid = uuid.uuid4().hex
    sub = await nc.subscribe(subjects.session_tokens(sid))
    await schedulers_know(nc, edges=1)
    opened = await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=48, eos_ids=eos))
    assert opened.error is None and opened.edge is not None
    tokens, events = await collect(sub)
    assert tokens == reference
    assert len(events) < len(tokens)  # several tokens per verification: it speculated
    assert events[-1].finish_reason in ("length", "stop")
    reply = await nc.request(subjects.stats("edge-agent", opened.edge), b"", timeout=5)
    counters = protocol.decode(reply.data, ServiceStats).counters
    # Proactive trees went out before their results, and those whose guess came true were
    # verified as they were — the output above is exact with them.
    assert counters["proactive_hits"] > 0 and counters["ahead_used"] > 0, counters
    await nc.close()


async def test_killing_the_edge_mid_generation_loses_and_repeats_nothing(stack, nats_url, tmp_path):
    ids, reference, eos = prompt_and_reference("Return the sum of a list of numbers.", 160)
    nc = await nats.connect(nats_url)
    sid = uuid.uuid4().hex
    sub = await nc.subscribe(subjects.session_tokens(sid))
    await schedulers_know(nc, edges=1)
    opened = await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=160, eos_ids=eos))
    assert opened.edge is not None
    killed, arrivals = [], []
    tokens, events = await collect(sub, on_first=lambda: (stack["edge-agent"].kill(), killed.append(time.monotonic())),
                                   arrivals=arrivals)
    assert tokens == reference
    assert "continue with server steps" in (tmp_path / "scheduler.log").read_text()
    after = [t for t in arrivals if t > killed[0]]
    # it goes on, server-side, within the draft deadline (4× the edge's recent peak turnaround,
    # at least 1 s, at most --draft-timeout 5 s) and a step; a loaded machine reaches the cap
    assert after and after[0] - killed[0] < 6.0
    await nc.close()


async def test_two_verifiers_share_sessions_and_every_output_is_exact(stack, nats_url, redis_url, cli_env, tmp_path):
    second = start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "1024",
                        "--max-sessions", "8"], cli_env, tmp_path / "verifier2.log")
    try:
        await asyncio.to_thread(wait_for, lambda: registered(nats_url, "verifier", second.pid), 60, "verifier 2")
        questions = [f"Write a function that checks item {i}." for i in range(4)]
        cases = [prompt_and_reference(q, 24) for q in questions]
        nc = await nats.connect(nats_url)
        await schedulers_know(nc, edges=1, verifiers=2)
        sids = [uuid.uuid4().hex for _ in cases]
        subs = [await nc.subscribe(subjects.session_tokens(sid)) for sid in sids]
        opened = [await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=24, eos_ids=eos))
                  for sid, (ids, _, eos) in zip(sids, cases, strict=True)]
        assert all(o.error is None for o in opened)
        assert len({o.verifier for o in opened}) == 2  # both verifiers hold sessions
        results = await asyncio.gather(*(collect(sub) for sub in subs))
        assert [tokens for tokens, _ in results] == [reference for _, reference, _ in cases]
        await nc.close()
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0


@pytest.mark.parametrize("strategy", ["pipeline", "fifo", "two-groups"])
async def test_every_strategy_serves_exactly(strategy, nats_url, redis_url, cli_env, tmp_path):
    procs = [
        start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "1024"], cli_env,
                  tmp_path / "verifier.log"),
        start_cli(["edge-agent", "--nats-url", nats_url, "--max-len", "1024"], cli_env, tmp_path / "edge.log"),
        start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url, "--strategy", strategy,
                   "--max-batch", "2", "--budget", "16", "--depth", "3"], cli_env, tmp_path / "scheduler.log"),
    ]
    try:
        for role, proc in zip(("verifier", "edge-agent", "scheduler"), procs, strict=True):
            await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(nats_url, r, p.pid), 60, role)
        cases = [prompt_and_reference(f"Write a function that cleans text {i}.", 40) for i in range(3)]
        nc = await nats.connect(nats_url)
        await schedulers_know(nc, edges=1)
        sids = [uuid.uuid4().hex for _ in cases]
        subs = [await nc.subscribe(subjects.session_tokens(sid)) for sid in sids]
        for sid, (ids, _, eos) in zip(sids, cases, strict=True):
            assert (await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=40,
                                                       eos_ids=eos))).error is None
        results = await asyncio.gather(*(collect(sub) for sub in subs))
        assert [tokens for tokens, _ in results] == [reference for _, reference, _ in cases]
        await nc.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()
