"""Faults survived, nothing lost: the scheduler, nats-server and redis-server restarted in the
middle of a generation, and an edge that stalls (SIGSTOP) and comes back (SIGCONT).

One stack of real processes — its own nats-server and redis-server (so they can be
restarted on the same port), a verifier, an edge agent, a scheduler with short timeouts
and a gateway — serves streaming requests through the official `openai` client while a
fault is injected after the first chunk. Each streamed text must be exactly the target's
greedy output, and the usage must count exactly its tokens: nothing lost, nothing repeated.
What each fault is allowed to do is in docs/reliability.md.
"""

import asyncio
import concurrent.futures
import os
import shutil
import signal
import time
import uuid

import nats
import openai
import pytest
from transformers import AutoTokenizer

from specedge import state, subjects
from specedge.launcher import Launcher, free_port
from specedge.models import BUNDLED_TARGET, bundled
from specedge.protocol import SessionOpen
from tests.helpers import registered, scrape, start_cli, wait_for
from tests.sessions import collect, open_session, prompt_and_reference

MODEL = "specedge-tiny-target"
TIMEOUT = "4"  # edge, verifier and scheduler heartbeat timeouts (s); heartbeats come every 2 s
SCHEDULER = ["scheduler", "--edge-timeout", TIMEOUT, "--verifier-timeout", TIMEOUT, "--draft-timeout", "1",
             "--request-timeout", "5", "--budget", "16", "--depth", "3"]
# What a draft the stalled edge sends for a session it lost may be refused as — nothing else.
STALE_DRAFT = ("not_the_sessions_edge", "unknown_session", "stale_cycle", "duplicate_draft")


class Stack:
    """The servers (restartable), the services as CLI processes, and an API key."""

    def __init__(self, logs) -> None:
        self.launcher = Launcher()
        self.nats = self.launcher.start_nats()
        self.redis = self.launcher.start_redis()
        self.logs, self.procs, self.started, self.faults = logs, {}, 0, None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SPECEDGE_")} | {"PYTHONUNBUFFERED": "1"}
        self.port, self.scheduler_metrics = free_port(), free_port()
        common = ["--nats-url", self.nats.url]
        self.start("verifier", ["verifier", *common, "--redis-url", self.redis.url, "--max-len", "1024"])
        self.start("edge-agent", ["edge-agent", *common, "--max-len", "1024"])
        self.start_scheduler()
        self.start("gateway", ["gateway", *common, "--redis-url", self.redis.url, "--port", str(self.port),
                                "--max-context", "1024"])
        self.key = asyncio.run(self._create_key())

    def start(self, role: str, argv: list[str], name: str | None = None) -> None:
        self.started += 1
        name = name or role
        proc = self.procs[name] = start_cli(argv, self.env, self.logs / f"{name}-{self.started}.log")
        wait_for(lambda: registered(self.nats.url, role, proc.pid), 90, name)

    def start_scheduler(self) -> None:
        self.start("scheduler", [*SCHEDULER, "--nats-url", self.nats.url, "--redis-url", self.redis.url,
                                 "--metrics-port", str(self.scheduler_metrics)])

    async def _create_key(self) -> str:
        async with state.connect_redis(self.redis.url) as client:
            return await state.ApiKeys(client).create("faults")

    def log(self, name: str) -> str:
        return "".join(p.read_text() for p in sorted(self.logs.glob(f"{name}-*.log")))

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        self.launcher.stop_all()


@pytest.fixture(scope="module")
def faults():
    """The one thread faults run in. It outlives every test: a server restarted from a thread
    dies with that thread (the launcher's parent-death signal is per thread)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Restarted servers and services outlive their test on purpose: the module's stack stops them."""
    yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory, faults):
    stack = Stack(tmp_path_factory.mktemp("faults"))
    stack.faults = faults
    yield stack
    stack.close()
    for log in stack.logs.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()


async def stream_with_fault(stack: Stack, question: str, max_tokens: int, fault) -> tuple[str, str, int]:
    """Stream one chat completion; `fault()` runs (in a thread) after the first text arrives.
    Returns the reference text, the streamed text and the completion tokens counted."""
    ids, reference, _ = prompt_and_reference(question, max_tokens)
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=stack.key, max_retries=0,
                                timeout=120)
    pieces, usage, faulted = [], None, None
    stream = await client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": question}])
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if faulted is None:
                faulted = asyncio.get_running_loop().run_in_executor(stack.faults, fault)
    await faulted
    await client.close()
    assert usage == len(reference), (usage, len(reference))
    return tok.decode(reference, skip_special_tokens=True), "".join(pieces), usage


def kill(stack: Stack, name: str) -> None:
    proc = stack.procs[name]
    proc.kill()
    proc.wait(timeout=10)


async def test_the_scheduler_killed_and_restarted_mid_generation_loses_and_repeats_nothing(stack):
    def restart_scheduler():
        kill(stack, "scheduler")
        stack.start_scheduler()

    started = time.monotonic()
    reference, streamed, _ = await stream_with_fault(
        stack, "Explain how to reverse a linked list, with code.", 120, restart_scheduler)
    assert streamed == reference
    assert "took over session" in stack.log("scheduler")
    assert time.monotonic() - started < 60


async def test_nats_server_restarted_mid_generation_loses_and_repeats_nothing(stack):
    def restart_nats():
        stack.nats = stack.launcher.restart(stack.nats)

    reference, streamed, _ = await stream_with_fault(
        stack, "Write a function that merges two sorted lists, and explain it.", 120, restart_nats)
    assert streamed == reference
    assert "reconnected" in stack.log("gateway") and "reconnected" in stack.log("scheduler")


async def test_redis_server_restarted_mid_generation_loses_and_repeats_nothing(stack):
    def restart_redis():
        stack.redis = stack.launcher.restart(stack.redis)  # SIGTERM: Redis writes its append-only file

    reference, streamed, _ = await stream_with_fault(
        stack, "Explain binary search step by step, with code.", 120, restart_redis)
    assert streamed == reference


async def test_redis_restarted_without_its_data_fails_the_request_with_a_clear_error(stack):
    def lose_redis():
        redis = stack.redis
        redis.stop()
        stack.launcher.children.remove(redis)
        shutil.rmtree(stack.launcher.workdir / f"redis-{redis.port}")  # as a Redis without persistence
        stack.redis = stack.launcher.start_redis(port=redis.port)

    started = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        await stream_with_fault(stack, "Explain quicksort in detail, with code.", 200, lose_redis)
    assert "Redis" in str(err.value.message), err.value.message
    assert time.monotonic() - started < 60
    # the stack still serves: a new key (the old one went with the data), a new request
    stack.key = await stack._create_key()
    reference, streamed, _ = await stream_with_fault(stack, "Sort a list.", 24, lambda: None)
    assert streamed == reference


async def test_an_edge_that_stalls_falls_back_to_server_steps_and_serves_again_when_it_comes_back(stack):
    edge = stack.procs["edge-agent"]
    edge_id = (await asyncio.to_thread(registered, stack.nats.url, "edge-agent", edge.pid))[0].instance_id
    before = scrape(f"http://127.0.0.1:{stack.scheduler_metrics}/metrics")

    def stall():
        os.kill(edge.pid, signal.SIGSTOP)

    try:
        reference, streamed, _ = await stream_with_fault(
            stack, "Write a function that parses a date and explain each step.", 120, stall)
        assert streamed == reference
        await asyncio.sleep(float(TIMEOUT) + 1)  # long enough to be dropped as silent, too
    finally:
        os.kill(edge.pid, signal.SIGCONT)
    # Back: it re-registers, frees what it held, and drafts for new sessions again, exactly.
    await asyncio.to_thread(wait_for, lambda: registered(stack.nats.url, "edge-agent", edge.pid), 30, "the edge")
    await asyncio.sleep(2.5)  # the scheduler has its heartbeat
    ids, reference, eos = prompt_and_reference("Return the sum of a list of numbers.", 48)
    nc = await nats.connect(stack.nats.url)
    try:
        sid = uuid.uuid4().hex
        sub = await nc.subscribe(subjects.session_tokens(sid))
        opened = await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=48, eos_ids=eos,
                                                    user="faults"))
        assert opened.error is None and opened.edge == edge_id
        tokens, events = await collect(sub)
    finally:
        await nc.close()
    assert tokens == reference and len(events) < len(tokens)  # it speculated: the edge drafts again
    after = scrape(f"http://127.0.0.1:{stack.scheduler_metrics}/metrics")
    deadline = "specedge:server_side_fallbacks_total{cause=draft_deadline}"
    assert after[deadline] - before.get(deadline, 0) >= 1  # the stalled edge's session went on server-side
    refused = {k: v - before.get(k, 0) for k, v in after.items()
               if "rejected_messages_total" in k and v > before.get(k, 0)}
    assert set(refused) <= {f"specedge:rejected_messages_total{{reason={r}}}" for r in STALE_DRAFT}, refused
