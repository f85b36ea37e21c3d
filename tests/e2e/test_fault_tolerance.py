"""The whole deployment on distributed infrastructure, losing a machine of each kind while
it serves: a three-node NATS cluster (auth callout configured), Redis with a primary, a
replica and three Sentinels, two gateways, two schedulers, two verifiers and six edges —
four with accounts of their own, two joining with a user's API key through the auth
callout while the requests run. Sixteen streaming clients (the official `openai` client;
four of them twice as long, so that some still stream when the last fault comes)
generate while, one after another, the NATS node the busiest scheduler is connected to,
the Redis primary and a verifier are killed. Every output is exactly the target's (no
token lost or repeated), no request fails, and the longest stall each fault caused is
printed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import urllib.request

import openai
import pytest
from transformers import AutoTokenizer

from specedge import bus
from specedge.launcher import Launcher, cluster_url, free_port
from specedge.models import BUNDLED_TARGET, bundled
from specedge.nats_auth import edge_identity, service_identity
from specedge.state import ApiKeys, connect_redis
from tests.helpers import registered, scrape, start_cli, stop_all, wait_for
from tests.sessions import prompt_and_reference

QUESTIONS = ["Explain what a hash map is.", "Sort a list in Python.", "Why is the sky blue?",
             "Write a haiku about the sea."]
NEW_TOKENS = 96
LONG = 4  # streams 0..LONG-1 (one per question) ask for twice as many tokens


def new_tokens(i: int) -> int:
    return NEW_TOKENS * (2 if i < LONG else 1)


def connections(monitor: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz?limit=1000", timeout=5) as response:
        return {c.get("name", "") for c in json.load(response).get("connections", [])}


class Stream:
    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.times: list[float] = []
        self.error: Exception | None = None
        self.done = False


@pytest.mark.timeout(900)
async def test_a_nats_node_the_redis_primary_and_a_verifier_lost_while_sixteen_clients_stream(cli_env, tmp_path):
    with Launcher() as launcher:
        auth = launcher.nats_auth
        auth.enable_callout()
        edges = [auth.add(edge_identity(f"edge-{i}")) for i in range(4)]
        nodes = launcher.start_nats_cluster(3)
        url, admin = bus.without_login(cluster_url(nodes)), cluster_url(nodes)
        (primary, replica, *_), redis_url = launcher.start_redis_ha()
        env = {**cli_env, "SPECEDGE_REQUEST_TIMEOUT": "5"}

        def account(role: str) -> list[str]:
            return ["--nats-url", url, "--credentials", str(auth.credentials_path(service_identity(role).nats_user))]

        common = ["--redis-url", redis_url]
        ports, metrics = [free_port(), free_port()], [free_port(), free_port()]
        procs = {"auth-callout": start_cli([
            "auth-callout", *account("auth-callout"), *common, "--check-s", "0.5", "--issuer", str(auth.issuer_path),
            "--system-credentials", str(auth.credentials_path(service_identity("system").nats_user))],
            env, tmp_path / "callout.log")}
        for i in range(2):
            procs[f"verifier-{i}"] = start_cli(["verifier", *account("verifier"), *common, "--max-len", "1024",
                                                "--max-sessions", "16"], env, tmp_path / f"verifier-{i}.log")
            procs[f"scheduler-{i}"] = start_cli(["scheduler", *account("scheduler"), *common,
                                                 "--metrics-port", str(metrics[i])], env, tmp_path / f"sched-{i}.log")
            procs[f"gateway-{i}"] = start_cli(["gateway", *account("gateway"), *common, "--port", str(ports[i]),
                                               "--max-context", "1024"], env, tmp_path / f"gateway-{i}.log")
        for i, creds in enumerate(edges):
            procs[f"edge-{i}"] = start_cli(["edge-agent", "--nats-url", url, "--credentials",
                                            str(auth.credentials_path(creds.nats_user)), "--max-len", "1024",
                                            "--max-sessions", "4"], env, tmp_path / f"edge-{i}.log")
        try:
            for role, count in (("verifier", 2), ("scheduler", 2), ("gateway", 2), ("edge-agent", 4)):
                await asyncio.to_thread(wait_for, lambda r=role, n=count: len(registered(admin, r)) >= n, 180, role)
            for name, proc in procs.items():
                assert proc.poll() is None, (tmp_path / f"{name}.log")
            async with connect_redis(redis_url) as redis:
                key = await ApiKeys(redis).create("carol")
            references = {q: prompt_and_reference(q, 2 * NEW_TOKENS)[1] for q in QUESTIONS}  # greedy: prefixes agree
            tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
            clients = [openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key=key, max_retries=0,
                                          timeout=300) for p in ports]
            streams = [Stream() for _ in range(16)]
            progressed = asyncio.Event()  # a chunk arrived on some stream

            async def generate(i: int) -> None:
                stream = streams[i]
                try:
                    response = await clients[i % 2].chat.completions.create(
                        model=BUNDLED_TARGET, messages=[{"role": "user", "content": QUESTIONS[i % 4]}],
                        max_tokens=new_tokens(i), temperature=0, stream=True)
                    async for chunk in response:
                        if chunk.choices and chunk.choices[0].delta.content:
                            stream.pieces.append(chunk.choices[0].delta.content)
                            stream.times.append(time.monotonic())
                            progressed.set()
                except Exception as exc:  # reported below
                    stream.error = exc
                stream.done = True
                progressed.set()

            faults: list[tuple[str, float]] = []

            async def progress(chunks: int) -> None:
                """Until every unfinished stream has `chunks` more chunks (or 20 s)."""
                marks = [len(s.times) for s in streams]
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not all(
                        s.done or len(s.times) >= m + chunks for s, m in zip(streams, marks, strict=True)):
                    progressed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(progressed.wait(), timeout=0.5)

            async def inject() -> None:
                await progress(2)
                running = {i: scrape(f"http://127.0.0.1:{m}/metrics").get("specedge:num_requests_running", 0)
                           for i, m in enumerate(metrics)}
                busiest = max(running, key=running.get)
                (me,) = [a.instance_id for a in await asyncio.to_thread(registered, admin, "scheduler", None)
                         if f"-{procs[f'scheduler-{busiest}'].pid}-" in a.instance_id]
                victim = next(n for n in nodes if me in connections(n.monitor))
                faults.append(("NATS node of the busiest scheduler", time.monotonic()))
                await asyncio.to_thread(victim.stop, 0.1)
                await progress(4)
                faults.append(("Redis primary", time.monotonic()))
                primary.process.send_signal(signal.SIGKILL)
                await progress(4)
                faults.append(("verifier", time.monotonic()))
                procs["verifier-0"].kill()

            tasks = [asyncio.create_task(generate(i)) for i in range(16)]
            for i in range(2):  # carol's own edges join with her key while her requests run
                procs[f"key-edge-{i}"] = start_cli(["edge-agent", "--nats-url", url, "--api-key", key, "--max-len",
                                                    "1024", "--max-sessions", "4"], env, tmp_path / f"key-edge-{i}.log")
            await asyncio.wait_for(asyncio.gather(inject(), *tasks), timeout=600)

            for i, stream in enumerate(streams):
                assert stream.error is None, (i, stream.error)
                expected = references[QUESTIONS[i % 4]][:new_tokens(i)]
                assert "".join(stream.pieces) == tok.decode(expected, skip_special_tokens=True), i
            assert len(faults) == 3 and faults[-1][1] < max(s.times[-1] for s in streams)  # all while streaming
            bounds = [t for _, t in faults] + [float("inf")]
            for (name, start), end in zip(faults, bounds[1:], strict=True):  # a gap is the last fault's before it ended
                gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:], strict=False) if start < b <= end]
                print(f"longest stall after losing the {name}: {max(gaps, default=0.0):.2f}s")
            joined = [a for a in await asyncio.to_thread(registered, admin, "edge-agent")
                      if a.instance_id.startswith("key-")]
            assert len(joined) == 2 and all(a.details["user"] == "carol" for a in joined)
            alive = [n for n, p in procs.items() if n != "verifier-0" and p.poll() is not None]
            assert not alive, alive
            assert replica.alive()
        finally:
            killed = procs.pop("verifier-0")
            killed.kill()
            killed.wait(timeout=30)
            stop_all(procs, tmp_path)
