"""Test helpers for driving the real CLI as processes and watching the bus."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

import nats

from specedge import protocol, registry, subjects
from specedge.protocol import ServiceAnnouncement, ServiceStats
from tests.conftest import SPECEDGE


def start_cli(args: Sequence[str], env: dict[str, str], log_path) -> subprocess.Popen:
    """Start `specedge ARGS` with stderr to a file (read it on failure)."""
    return subprocess.Popen([*SPECEDGE, *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=open(log_path, "wb"), text=True)


def discover(nats_url: str, wait_s: float = 0.3) -> list[ServiceAnnouncement]:
    async def ask():
        nc = await nats.connect(servers=nats_url.split(","))
        try:
            return await registry.discover(nc, wait_s)
        finally:
            await nc.close()

    return asyncio.run(ask())


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def registered(nats_url: str, role: str, pid_hint: int | None = None) -> list[ServiceAnnouncement]:
    found = [a for a in discover(nats_url) if a.role == role]
    if pid_hint is not None:
        found = [a for a in found if f"-{pid_hint}-" in a.instance_id]
    return found


def wait_until_serving(nats_url: str, procs: dict[str, subprocess.Popen], gateway: str | None = None,
                       timeout_s: float = 60) -> None:
    """Each process registered under its role (its key in `procs`); with `gateway`, that
    gateway healthy and one heartbeat more, so the scheduler has heard the edges."""
    import httpx

    for role, proc in procs.items():
        wait_for(lambda r=role, p=proc: registered(nats_url, r, p.pid), timeout_s, role)
    if gateway is not None:
        wait_for(lambda: httpx.get(f"{gateway}/health").status_code == 200, 30, "a healthy gateway")
        edges = sum(1 for role in procs if role.startswith("edge"))

        async def known() -> None:
            nc = await nats.connect(nats_url)
            try:
                await schedulers_know(nc, edges=edges)
            finally:
                await nc.close()

        asyncio.run(known())


async def schedulers_know(nc, edges: int, verifiers: int = 1, timeout_s: float = 30) -> None:
    """Poll every registered scheduler's stats until each knows at least `edges` edges and
    `verifiers` verifiers (from their heartbeats) — instead of sleeping for a heartbeat."""
    deadline = time.monotonic() + timeout_s
    while True:
        schedulers = [a for a in await registry.discover(nc, wait_s=0.2) if a.role == "scheduler"]
        counts = []
        for ann in schedulers:
            with contextlib.suppress(Exception):
                reply = await nc.request(subjects.stats("scheduler", ann.instance_id), b"", timeout=5)
                counts.append(protocol.decode(reply.data, ServiceStats).counters)
        if schedulers and len(counts) == len(schedulers) and \
                all(c.get("edges", 0) >= edges and c.get("verifiers", 0) >= verifiers for c in counts):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for schedulers to know {edges} edges and "
                                 f"{verifiers} verifiers: {counts}")
        await asyncio.sleep(0.1)


async def record_session(redis_url: str, session_id: str, tokens: list[int], **kwargs) -> None:
    """Create a session's Redis record, as the scheduler does before the verifier prefills it."""
    from specedge.protocol import SamplingSpec
    from specedge.state import SessionStore, connect_redis

    async with connect_redis(redis_url) as client:
        await SessionStore(client).create(session_id, tokens, kwargs.pop("sampling", SamplingSpec()), **kwargs)


async def committed_tokens(redis_url: str, session_id: str) -> list[int] | None:
    from specedge.state import SessionStore, connect_redis

    async with connect_redis(redis_url) as client:
        record = await SessionStore(client).load(session_id)
    return None if record is None else record.tokens


def scrape(url: str) -> dict[str, float]:
    """A Prometheus endpoint's samples: `name{label=value,…}` (labels sorted) -> value."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


@dataclasses.dataclass
class Stack:
    """A running `specedge up`: the gateway's URL, the API key it printed, its Redis, its NATS
    (with the admin account's login, from the accounts folder it printed) and its pid."""

    url: str
    key: str
    redis_url: str
    nats_url: str
    pid: int


READY = re.compile(r"gateway (http://\S+) .*API key (\S+) ;.*nats (nats://\S+); redis (redis[+a-z]*://[^\s;]+);"
                   r".*NATS accounts in (\S+) ")


@contextlib.contextmanager
def specedge_up(*args: str, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """`specedge up --port 0 ARGS` (with `env` added to a clean environment) until the block
    ends (then Ctrl-C; it must exit 0)."""
    from specedge.bus import without_login
    from specedge.nats_auth import Credentials

    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECEDGE_")} | (env or {})
    proc = subprocess.Popen([*SPECEDGE, "up", "--port", "0", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = proc.stdout.readline()
    match = READY.search(line)
    if not match:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"specedge up did not start: {line!r}")
    url, key, nats_url, redis_url, accounts = match.groups()
    admin = Credentials.load(pathlib.Path(accounts) / "specedge-admin.creds.json")
    nats_url = without_login(nats_url).replace("nats://", f"nats://{admin.nats_user}:{admin.password}@")
    try:
        yield Stack(url, key, redis_url, nats_url, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def start_on_accounts(secured: dict, redis_url: str, metrics_port: int, tmp_path, env: dict[str, str],
                      edge: bool = True) -> dict[str, subprocess.Popen]:
    """A verifier, a scheduler (metrics on `metrics_port`) and (`edge`) alice's edge, each
    logging in with its own account of `secured` (the `secured` fixture)."""
    from specedge.nats_auth import service_identity

    auth, url = secured["auth"], secured["url"]

    def account(identity) -> list[str]:
        return ["--nats-url", url, "--credentials", str(auth.credentials_path(identity.nats_user))]

    procs = {
        "verifier": start_cli(["verifier", *account(service_identity("verifier")), "--redis-url", redis_url,
                               "--max-len", "1024"], env, tmp_path / "verifier.log"),
        "scheduler": start_cli(["scheduler", *account(service_identity("scheduler")), "--redis-url", redis_url,
                                "--metrics-port", str(metrics_port)], env, tmp_path / "scheduler.log"),
    }
    if edge:
        procs["edge-agent"] = start_cli(["edge-agent", *account(secured["alice"])], env, tmp_path / "edge.log")
    return procs


def stop_all(procs: dict[str, subprocess.Popen], logs) -> None:
    """SIGTERM every process, wait for each, and check that no log in `logs` has a traceback."""
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        proc.wait(timeout=30)
    for log in logs.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()
