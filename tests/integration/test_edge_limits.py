"""What one edge may cost everyone else, against real processes on accounts of their own.

A flooding edge (bob's, on his own NATS account) publishes 512-byte garbage to the drafts
subject its permissions allow, addressed to the live scheduler, as fast as a client
process can: the scheduler cuts it off within its offence limit and unsubscribes, so the
NATS server drops the rest before it costs the scheduler anything. Alice's streamed
requests meanwhile each take at most twice as long as before the flood (the median of
three), and stay exact.
"""

import asyncio
import shutil
import statistics
import subprocess
import sys
import time
import uuid

import nats
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from specedge import protocol, subjects
from specedge.launcher import free_port
from specedge.models import BUNDLED_DRAFT, bundled
from specedge.protocol import SessionOpen
from tests.helpers import registered, schedulers_know, scrape, start_cli, start_on_accounts, stop_all, wait_for
from tests.sessions import collect, open_session, prompt_and_reference

FLOODER = """
import asyncio, os, sys, time
import nats

os.nice(10)  # a user's machine: its own CPU, not the server side's (this one has two cores for everything)

async def main(url, user, password, subject, seconds):
    nc = await nats.connect(url, user=user, password=password, pending_size=64 * 1024 * 1024)
    garbage, sent, end = b"\\xc1" * 512, 0, time.monotonic() + seconds
    print("flooding", flush=True)
    while time.monotonic() < end:
        for _ in range(1000):
            await nc.publish(subject, garbage)
        sent += 1000
        await asyncio.sleep(0)
    await nc.flush()
    print("sent", sent, flush=True)
    await nc.close()

asyncio.run(main(*sys.argv[1:5], float(sys.argv[5])))
"""


def start_flood(url: str, account, subject: str, seconds: float) -> subprocess.Popen:
    """A separate process (a core of its own, like a user's machine) flooding `subject`."""
    return subprocess.Popen([sys.executable, "-c", FLOODER, url, account.nats_user, account.password, subject,
                             str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def listed(runs) -> str:
    return ", ".join(f"{t:.3f}s" for t, _ in runs)


async def timed_session(nc, ids: list[int], eos: list[int]) -> tuple[float, list[int]]:
    sid = uuid.uuid4().hex
    sub = await nc.subscribe(subjects.session_tokens(sid))
    start = time.monotonic()
    opened = await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=32, eos_ids=eos,
                                                user="alice"))
    assert opened.error is None and opened.edge == "alice-laptop"
    tokens, _ = await collect(sub)
    await sub.unsubscribe()
    return time.monotonic() - start, tokens


async def test_a_flooding_edge_is_cut_off_and_others_stay_within_twice_their_latency(secured, cli_env, tmp_path):
    url, admin, metrics_port = secured["url"], secured["admin"], free_port()
    procs = start_on_accounts(secured, secured["launcher"].start_redis().url, metrics_port, tmp_path, cli_env)
    flood = None
    try:
        for role, proc in procs.items():
            await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(admin, r, None) and p.poll() is None,
                                    90, role)
        scheduler = (await asyncio.to_thread(registered, admin, "scheduler"))[0].instance_id
        bob = secured["bob"]
        bob_nc = await nats.connect(url, user=bob.nats_user, password=bob.password)
        me = protocol.ServiceAnnouncement(role="edge-agent", instance_id="bob-laptop", name="bob", version="x",
                                          heartbeat_s=1.0, details={"max_sessions": "8", "pool": "user",
                                                                    "user": "bob"})
        await bob_nc.publish(subjects.registry_announce("edge-agent", "bob-laptop", "user", "bob"),
                             protocol.encode(me))  # the scheduler now reads bob's drafts to it
        await bob_nc.flush()

        ids, reference, eos = prompt_and_reference("Explain what a hash map is.", 32)
        nc = await nats.connect(admin)  # acting as the gateway
        await timed_session(nc, ids, eos)  # warm
        before = [await timed_session(nc, ids, eos) for _ in range(3)]
        assert all(tokens == reference for _, tokens in before)

        flood = start_flood(url, bob, subjects.drafts("bob-laptop", scheduler), seconds=25)
        assert (await asyncio.to_thread(flood.stdout.readline)).strip() == "flooding"
        during = [await timed_session(nc, ids, eos) for _ in range(3)]
        assert flood.poll() is None, "the flood ended before the measurement did"
        assert all(tokens == reference for _, tokens in during)
        base, flooded = statistics.median(t for t, _ in before), max(t for t, _ in during)
        print(f"latency before the flood {listed(before)}, during it {listed(during)}")
        assert flooded <= 2 * base, (before, during)
        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert metrics["specedge:edges_cut_off_total"] == 1
        refused = sum(v for k, v in metrics.items() if k.startswith("specedge:rejected_messages_total"))
        assert 50 <= refused < 10_000  # the rest never reached the scheduler
        # bob's edge stays cut off: his announcements are dropped, he gets no session
        await bob_nc.publish(subjects.registry_announce("edge-agent", "bob-laptop", "user", "bob"),
                             protocol.encode(me))
        sid = uuid.uuid4().hex
        opened = await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=4, eos_ids=eos,
                                                    user="bob"))
        assert opened.error is None and opened.edge is None
        await nc.close()
        await bob_nc.close()
    finally:
        if flood is not None:
            flood.kill()
            flood.wait()
        stop_all(procs, tmp_path)
    assert "edge bob-laptop cut off" in (tmp_path / "scheduler.log").read_text()


def random_draft(path) -> str:
    """The bundled draft model's shape and tokenizer with random weights: it drafts, uselessly."""
    source = bundled(BUNDLED_DRAFT)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(f"{source}/{name}", path / name)
    return str(path)


async def run_concurrently(nc, cases) -> tuple[float, list[list[int]], list[str | None]]:
    async def one(ids, eos):
        sid = uuid.uuid4().hex
        sub = await nc.subscribe(subjects.session_tokens(sid))
        opened = await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=48, eos_ids=eos))
        assert opened.error is None
        tokens, _ = await collect(sub)
        await sub.unsubscribe()
        return tokens, opened.edge

    start = time.monotonic()
    done = await asyncio.gather(*(one(ids, eos) for ids, _, eos in cases))
    return time.monotonic() - start, [t for t, _ in done], [e for _, e in done]


async def test_sessions_leave_an_edge_whose_drafts_are_useless(nats_url, redis_url, cli_env, tmp_path):
    """A pool edge whose draft model has random weights joins beside a good one: the
    scheduler measures that its trees are not accepted, stops giving it sessions and moves
    its sessions to the good edge, so 16 concurrent requests take at most 1.2× as long as
    without it — and every output is still the target's own."""
    metrics_port = free_port()
    procs = {
        "verifier": start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "1024",
                               "--max-sessions", "16"], cli_env, tmp_path / "verifier.log"),
        "scheduler": start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url,
                                "--metrics-port", str(metrics_port)], cli_env, tmp_path / "scheduler.log"),
        "good": start_cli(["edge-agent", "--nats-url", nats_url, "--max-sessions", "16"], cli_env,
                          tmp_path / "good.log"),
    }
    try:
        nc = await nats.connect(nats_url)
        await asyncio.to_thread(wait_for, lambda: registered(nats_url, "verifier", None), 90, "verifier")
        await schedulers_know(nc, edges=1, timeout_s=90)
        good = (await asyncio.to_thread(registered, nats_url, "edge-agent"))[0].instance_id
        cases = [prompt_and_reference(f"Write a short function number {i} that adds two numbers.", 48)
                 for i in range(16)]
        await run_concurrently(nc, cases[:4])  # warm
        alone, outputs, _ = await run_concurrently(nc, cases)
        assert outputs == [reference for _, reference, _ in cases]

        procs["useless"] = start_cli(["edge-agent", "--nats-url", nats_url, "--max-sessions", "16",
                                      "--draft", random_draft(tmp_path / "random-draft")], cli_env,
                                     tmp_path / "useless.log")
        await schedulers_know(nc, edges=2, timeout_s=90)
        beside, outputs, edges = await run_concurrently(nc, cases)
        assert outputs == [reference for _, reference, _ in cases]
        assert {e for e in edges if e is not None} - {good}, edges  # it was given sessions,
        print(f"16 requests: {alone:.2f}s with the good edge alone, {beside:.2f}s with the useless one beside it")
        assert beside <= 1.2 * alone, (alone, beside)
        moves = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert moves.get("specedge:drafter_moves_total{cause=useless_drafter}", 0) >= 1  # which moved away
        await nc.close()
    finally:
        stop_all(procs, tmp_path)

