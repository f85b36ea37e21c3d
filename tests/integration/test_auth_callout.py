"""Edges that join with their own key through the NATS auth callout, against a real
nats-server (with `auth_callout` configured), the real `specedge auth-callout` process and
a real Redis — and never a nats-server reload.

Alice's and bob's API keys (and an edge token) let their edges in as `key-…` edges bound to
their owner; a revoked key is refused at once and its live connection is closed within
seconds; an edge id that another user's edge holds, an id outside the `key-` namespace, a
wrong key, and another user's subjects are all refused. An edge agent started with
`--api-key` drafts for its user's session, whose output is exactly the target's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import nats
import pytest
import redis.asyncio as aioredis

from specedge import bus, protocol, subjects
from specedge.launcher import Launcher, free_port
from specedge.nats_auth import service_identity
from specedge.protocol import EdgeIdentity
from specedge.state import ApiKeys
from tests.helpers import registered, start_cli, start_on_accounts, stop_all, wait_for
from tests.sessions import one_session


@pytest.fixture
def callout(redis_url, cli_env, tmp_path):
    """A nats-server whose auth callout is `specedge auth-callout` (checking keys in `redis_url`)."""
    with Launcher() as launcher:
        auth = launcher.nats_auth
        auth.enable_callout()
        server = launcher.start_nats()
        url = bus.without_login(server.url)
        proc = start_cli(["auth-callout", "--nats-url", url, "--redis-url", redis_url, "--check-s", "0.25",
                          "--credentials", str(auth.credentials_path(service_identity("auth-callout").nats_user)),
                          "--system-credentials", str(auth.credentials_path(service_identity("system").nats_user)),
                          "--issuer", str(auth.issuer_path)], cli_env, tmp_path / "callout.log")
        wait_for(lambda: "auth callout ready" in (tmp_path / "callout.log").read_text() or proc.poll() is not None,
                 60, "the auth callout")
        assert proc.poll() is None, (tmp_path / "callout.log").read_text()
        try:
            yield {"launcher": launcher, "auth": auth, "server": server, "url": url, "admin": server.url,
                   "redis_url": redis_url}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert "Traceback" not in (tmp_path / "callout.log").read_text()


async def keys(redis_url: str) -> tuple[aioredis.Redis, ApiKeys]:
    client = aioredis.Redis.from_url(redis_url)
    return client, ApiKeys(client)


async def join(url: str, edge_id: str, key: str, **options) -> nats.NATS:
    return await nats.connect(url, user=edge_id, password=key, allow_reconnect=False, connect_timeout=5, **options)


async def whoami(nc: nats.NATS, edge_id: str) -> EdgeIdentity:
    sub = await nc.subscribe(subjects.edge_identity(edge_id))
    await nc.publish(subjects.auth_whoami(edge_id), b"")
    return protocol.decode((await sub.next_msg(timeout=5)).data, EdgeIdentity)


async def test_keys_join_edges_bound_to_their_owner_and_nothing_else(callout):
    client, api = await keys(callout["redis_url"])
    suffix = uuid.uuid4().hex[:8]
    alice_key, bob_key = await api.create(f"alice-{suffix}"), await api.create(f"bob-{suffix}")
    shared_token = await api.create("", edge=True)
    alice_id, bob_id, pool_id = f"key-alice-{suffix}", f"key-bob-{suffix}", f"key-pool-{suffix}"
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    alice = await join(callout["url"], alice_id, alice_key, error_cb=on_error)
    pool = await join(callout["url"], pool_id, shared_token)
    admin = await nats.connect(callout["admin"])
    try:
        assert await whoami(alice, alice_id) == EdgeIdentity(edge_id=alice_id, pool="user", user=f"alice-{suffix}")
        assert await whoami(pool, pool_id) == EdgeIdentity(edge_id=pool_id, pool="shared", user="")

        # Confined like an edge account: its own subjects only.
        own = await alice.subscribe(subjects.edge_assign(alice_id))
        spied = await alice.subscribe(f"{subjects.PREFIX}.edge.{pool_id}.>")
        tokens = await alice.subscribe(f"{subjects.PREFIX}.session.*.tokens")
        drafts = await admin.subscribe(f"{subjects.PREFIX}.drafts.>")
        for nc in (alice, admin):
            await nc.flush()
        await admin.publish(subjects.edge_assign(alice_id), b"alice's prompt")
        await admin.publish(subjects.edge_assign(pool_id), b"someone's prompt")
        await admin.publish(subjects.session_tokens("s1"), b"tokens")
        await alice.publish(subjects.drafts(pool_id, "sched-1"), b"forged draft")
        await alice.publish(subjects.drafts(alice_id, "sched-1"), b"alice's draft")
        for nc in (alice, admin):
            await nc.flush()
        assert (await own.next_msg(timeout=2)).data == b"alice's prompt"
        assert (await drafts.next_msg(timeout=2)).data == b"alice's draft"
        await asyncio.sleep(0.3)
        assert spied.pending_msgs == tokens.pending_msgs == drafts.pending_msgs == 0
        assert any("permissions violation" in e.lower() for e in errors), errors

        # Refused: another user's edge id, an id outside `key-`, a wrong key, no key.
        for edge_id, key in ((alice_id, bob_key), ("alice-laptop", alice_key), (bob_id, "sk-specedge-not-a-key"),
                             (bob_id, "")):
            with pytest.raises((nats.errors.Error, OSError)):
                await join(callout["url"], edge_id, key)
        bob = await join(callout["url"], bob_id, bob_key)  # his own key and a free id: in
        await bob.close()
    finally:
        for nc in (alice, pool, admin):
            await nc.close()
        await client.aclose()


async def test_a_revoked_key_is_refused_and_its_edge_disconnected_within_seconds(callout):
    client, api = await keys(callout["redis_url"])
    suffix = uuid.uuid4().hex[:8]
    key, token = await api.create(f"carol-{suffix}"), await api.create(f"carol-{suffix}", edge=True)
    assert await api.user_of(token) is None  # an edge token is not an API key (the gateway's 401)
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    carol = await join(callout["url"], f"key-carol-{suffix}", key, closed_cb=on_closed)
    other = await join(callout["url"], f"key-carol2-{suffix}", token)  # her edge token: not revoked
    try:
        await whoami(carol, f"key-carol-{suffix}")
        revoked_at = time.monotonic()
        assert await api.revoke(key) == 1
        await asyncio.wait_for(closed.wait(), timeout=10)
        print(f"revoked edge disconnected after {time.monotonic() - revoked_at:.2f}s")
        assert time.monotonic() - revoked_at < 5
        with pytest.raises((nats.errors.Error, OSError)):
            await join(callout["url"], f"key-carol-{suffix}", key)
        assert await whoami(other, f"key-carol2-{suffix}")  # the other key's edge stays
        assert other.is_connected
    finally:
        with contextlib.suppress(Exception):
            await carol.close()
        await other.close()
        await client.aclose()


async def test_an_edge_agent_joins_with_an_api_key_and_drafts_its_users_session(callout, cli_env, tmp_path):
    client, api = await keys(callout["redis_url"])
    key = await api.create("dave")
    secured = {"auth": callout["auth"], "url": callout["url"], "alice": None}
    metrics_port = free_port()
    procs = start_on_accounts(secured, callout["redis_url"], metrics_port, tmp_path, cli_env, edge=False)
    procs["edge-agent"] = start_cli(["edge-agent", "--nats-url", callout["url"], "--api-key", key], cli_env,
                                    tmp_path / "edge.log")
    admin = callout["admin"]
    try:
        for role, proc in procs.items():
            await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(admin, r, None) and p.poll() is None,
                                    90, role)
        (edge,) = await asyncio.to_thread(registered, admin, "edge-agent")
        assert edge.instance_id.startswith("key-") and edge.details["user"] == "dave"
        assert edge.details["pool"] == "user"

        opened, tokens, reference = await one_session(admin, "Explain what a hash map is.", 32, user="dave")
        assert opened.error is None and opened.edge == edge.instance_id
        assert tokens == reference
    finally:
        stop_all(procs, tmp_path)
        await client.aclose()
    for log in tmp_path.glob("*.log"):
        assert key not in log.read_text()


def test_nats_auth_init_callout_writes_an_issuer_and_the_callout_block(tmp_path, cli_env):
    import json
    import subprocess

    from tests.conftest import SPECEDGE

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SPECEDGE, "nats-auth", *args, "--dir", str(tmp_path)], env=cli_env,
                              capture_output=True, text=True, timeout=60)

    done = run("init", "--callout")
    assert done.returncode == 0, done.stderr
    assert "specedge auth-callout --issuer" in done.stdout
    issuer = tmp_path / "issuer.nk"
    assert oct(issuer.stat().st_mode & 0o777) == "0o600" and issuer.read_text().startswith("SA")
    config = (tmp_path / "auth.conf").read_text()
    block = json.loads(config.split("authorization: ", 1)[1])["auth_callout"]
    assert block["account"] == "SPECEDGE" and block["issuer"].startswith("A")
    assert {"specedge-auth-callout", "specedge-system", "specedge-gateway"} <= set(block["auth_users"])
    assert issuer.read_text().strip() not in config  # only the public key
    assert run("add-edge", "key-mine").returncode == 2  # the key-joined namespace is the callout's
    assert run("add-edge", "alice-pc", "--user", "alice").returncode == 0  # edges with accounts still work
    assert "auth_callout" in (tmp_path / "auth.conf").read_text()
