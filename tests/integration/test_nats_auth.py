"""NATS authentication and subject permissions, against a real nats-server.

Two users' edges (alice's and bob's) each have their own account from `specedge nats-auth`.
Bob's edge, hostile, tries to read alice's assignments (her prompts), any session's tokens
and other edges' drafts, to publish drafts as alice's edge and to announce itself as
alice's edge: the server drops all of it, and the scheduler refuses an announcement that
claims a user its subject does not carry. Meanwhile alice's session, drafted on her own
edge by services that each log in with their own account, is exactly the target's output.
"""

import asyncio
import os
import signal
import subprocess
import time

import nats
import pytest

from specedge import bus, protocol, subjects
from specedge.launcher import free_port
from specedge.nats_auth import Credentials
from specedge.protocol import ServiceAnnouncement
from tests.conftest import SPECEDGE
from tests.helpers import registered, scrape, start_on_accounts, stop_all, wait_for
from tests.sessions import one_session

PREFIX = subjects.PREFIX


async def login(url: str, creds: Credentials, errors: list[str] | None = None):
    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    return await nats.connect(url, user=creds.nats_user, password=creds.password, error_cb=on_error,
                              allow_reconnect=False)


async def test_wrong_credentials_are_refused_at_once(secured):
    forged = secured["bob"].model_copy(update={"password": "not-the-password"})
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="refused the credentials of bob"):
        async with bus.connect(secured["url"], "bob", initial_timeout_s=20, credentials=None) as _:
            pass  # no login at all
    with pytest.raises(ConnectionError, match="refused the credentials of edge-bob-laptop"):
        path = secured["auth"].path / "forged.json"
        forged.save(path)
        async with bus.connect(secured["url"], "bob", initial_timeout_s=20, credentials=str(path)):
            pass
    assert time.monotonic() - start < 10  # not retried until the timeout


async def test_an_edge_reads_only_its_own_subjects_and_publishes_only_as_itself(secured):
    admin = await nats.connect(secured["admin"])
    alice = await login(secured["url"], secured["alice"])
    errors: list[str] = []
    bob = await login(secured["url"], secured["bob"], errors)
    try:
        spied = {name: await bob.subscribe(subject) for name, subject in {
            "alice's assignments": subjects.edge_assign("alice-laptop"),
            "alice's everything": f"{PREFIX}.edge.alice-laptop.>",
            "session tokens": f"{PREFIX}.session.*.tokens",
            "drafts": f"{PREFIX}.drafts.>",
            "announcements": f"{PREFIX}.registry.announce.>",
            "sessions opened": subjects.SESSIONS_OPEN,
        }.items()}
        bob_own = await bob.subscribe(subjects.edge_assign("bob-laptop"))
        alice_own = await alice.subscribe(subjects.edge_assign("alice-laptop"))
        seen_drafts = await admin.subscribe(f"{PREFIX}.drafts.>")
        seen_announcements = await admin.subscribe(f"{PREFIX}.registry.announce.>")
        for nc in (admin, alice, bob):
            await nc.flush()

        await admin.publish(subjects.edge_assign("alice-laptop"), b"alice's prompt")
        await admin.publish(subjects.edge_assign("bob-laptop"), b"bob's prompt")
        await admin.publish(subjects.session_tokens("s1"), b"tokens")
        await admin.publish(subjects.SESSIONS_OPEN, b"a request")
        # Bob's forgeries: drafts as alice's edge, an announcement on alice's subject, on a
        # subject claiming user alice for his own edge; then what he may send.
        await bob.publish(subjects.drafts("alice-laptop", "sched-1"), b"forged draft")
        await bob.publish(subjects.registry_announce("edge-agent", "alice-laptop", "user", "alice"), b"forged")
        await bob.publish(subjects.registry_announce("edge-agent", "bob-laptop", "user", "alice"), b"forged")
        await bob.publish(subjects.registry_announce("edge-agent", "bob-laptop", "shared", ""), b"forged")
        await bob.publish(subjects.drafts("bob-laptop", "sched-1"), b"bob's draft")
        await bob.publish(subjects.registry_announce("edge-agent", "bob-laptop", "user", "bob"), b"bob's announcement")
        for nc in (admin, alice, bob):
            await nc.flush()
        await asyncio.sleep(0.5)

        assert (await alice_own.next_msg(timeout=2)).data == b"alice's prompt"
        assert (await bob_own.next_msg(timeout=2)).data == b"bob's prompt"
        for name, sub in spied.items():
            assert sub.pending_msgs == 0, f"bob's edge read {name}"
        assert (await seen_drafts.next_msg(timeout=2)).data == b"bob's draft"
        assert seen_drafts.pending_msgs == 0  # the forged draft never reached anyone
        announced = await seen_announcements.next_msg(timeout=2)
        assert announced.data == b"bob's announcement"
        assert seen_announcements.pending_msgs == 0
        assert any("permissions violation" in e.lower() for e in errors), errors
    finally:
        for nc in (admin, alice, bob):
            await nc.close()


async def test_a_revoked_edge_is_disconnected_on_reload(secured):
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    creds = secured["bob"]
    bob = await nats.connect(secured["url"], user=creds.nats_user, password=creds.password, closed_cb=on_closed,
                             max_reconnect_attempts=3, reconnect_time_wait=0.2)
    assert secured["auth"].revoke(creds.nats_user)
    os.kill(secured["server"].pid, signal.SIGHUP)  # nats-server re-reads auth.conf
    await asyncio.wait_for(closed.wait(), timeout=10)
    assert bob.is_closed
    with pytest.raises(nats.errors.Error):
        await login(secured["url"], creds)


async def test_services_on_their_own_accounts_serve_a_users_own_edge_and_refuse_a_forged_claim(secured, cli_env,
                                                                                               tmp_path):
    url = secured["url"]
    redis_url = secured["launcher"].start_redis().url
    metrics_port = free_port()
    procs = start_on_accounts(secured, redis_url, metrics_port, tmp_path, cli_env)
    admin = secured["admin"]
    try:
        for role, proc in procs.items():
            await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(admin, r, None) and p.poll() is None,
                                    90, role)
        edge = (await asyncio.to_thread(registered, admin, "edge-agent"))[0]
        assert edge.instance_id == "alice-laptop" and edge.details["user"] == "alice"

        # Bob's edge announces, on his own subject, that it is alice's: refused, never assigned.
        bob = await login(url, secured["bob"])
        claim = ServiceAnnouncement(role="edge-agent", instance_id="bob-laptop", name="bob", version="x",
                                    heartbeat_s=1.0, details={**edge.details, "user": "alice", "max_sessions": "64"})
        stolen = await bob.subscribe(f"{PREFIX}.edge.bob-laptop.>")
        for _ in range(3):
            await bob.publish(subjects.registry_announce("edge-agent", "bob-laptop", "user", "bob"),
                              protocol.encode(claim))
            await asyncio.sleep(0.3)

        opened, tokens, reference = await one_session(admin, "Explain what a hash map is.", 32, user="alice")
        assert opened.error is None and opened.edge == "alice-laptop"
        assert tokens == reference
        assert stolen.pending_msgs == 0  # nothing of alice's reached bob's edge
        refused = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert refused.get("specedge:rejected_messages_total{reason=identity_mismatch}", 0) >= 3
        await bob.close()
    finally:
        stop_all(procs, tmp_path)
    for log in tmp_path.glob("*.log"):
        assert secured["alice"].password not in log.read_text()


def test_nats_auth_command_creates_lists_and_revokes_accounts(tmp_path, cli_env):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SPECEDGE, "nats-auth", *args, "--dir", str(tmp_path)], env=cli_env,
                              capture_output=True, text=True, timeout=60)

    assert run("init").returncode == 0
    added = run("add-edge", "carol-pc", "--user", "carol@example.com")
    assert added.returncode == 0, added.stderr
    assert "--credentials" in added.stdout and "reload" in added.stdout
    creds_file = tmp_path / "edge-carol-pc.creds.json"
    assert oct(creds_file.stat().st_mode & 0o777) == "0o600"
    creds = Credentials.load(creds_file)
    assert (creds.edge_id, creds.pool, creds.user) == ("carol-pc", "user", "carol@example.com")
    listing = run("list").stdout
    assert "edge-carol-pc" in listing and "specedge-scheduler" in listing and creds.password not in listing
    config = (tmp_path / "auth.conf").read_text()
    assert creds.password not in config and "$2b$" in config  # only bcrypt hashes
    assert run("add-edge", "carol-pc").returncode == 2  # exists already
    assert run("add-edge", "bad.id").returncode == 2
    assert run("revoke", "edge-carol-pc").returncode == 0
    assert not creds_file.exists() and "edge-carol-pc" not in run("list").stdout
    assert run("revoke", "edge-carol-pc").returncode == 1


async def test_the_gateway_and_verifier_accounts_reach_only_their_own_subjects(secured):
    from specedge.nats_auth import service_identity

    admin = await nats.connect(secured["admin"])
    logins = {role: Credentials.load(secured["auth"].credentials_path(service_identity(role).nats_user))
              for role in ("gateway", "verifier")}
    errors: dict[str, list[str]] = {role: [] for role in logins}
    conns = {role: await login(secured["url"], creds, errors[role]) for role, creds in logins.items()}
    try:
        seen = await admin.subscribe(f"{PREFIX}.>")
        spied = {
            "gateway": [await conns["gateway"].subscribe(s) for s in (f"{PREFIX}.edge.>", f"{PREFIX}.drafts.>",
                                                                        f"{PREFIX}.verifier.*.verify")],
            "verifier": [await conns["verifier"].subscribe(s) for s in (f"{PREFIX}.edge.>", f"{PREFIX}.session.>")],
        }
        allowed = await conns["gateway"].subscribe(subjects.session_tokens("s1"))
        for nc in (admin, *conns.values()):
            await nc.flush()
        await conns["gateway"].publish(subjects.drafts("alice-laptop", "sched-1"), b"forged draft")
        await conns["gateway"].publish(subjects.edge_assign("alice-laptop"), b"forged assignment")
        await conns["verifier"].publish(subjects.session_tokens("s1"), b"forged tokens")
        await conns["verifier"].publish(subjects.SESSIONS_OPEN, b"forged request")
        await conns["gateway"].publish(subjects.SESSIONS_CLOSE, b"a close")  # its own part of the protocol
        await admin.publish(subjects.edge_assign("alice-laptop"), b"a prompt")
        await admin.publish(subjects.verifier_verify("v1"), b"a batch")
        await admin.publish(subjects.session_tokens("s1"), b"tokens")
        for nc in (admin, *conns.values()):
            await nc.flush()
        assert (await allowed.next_msg(timeout=2)).data == b"tokens"
        await asyncio.sleep(0.3)
        heard = []
        while seen.pending_msgs:
            heard.append((await seen.next_msg(timeout=1)).data)
        assert b"a close" in heard and not {b"forged draft", b"forged assignment", b"forged tokens",
                                            b"forged request"} & set(heard)
        for role, subs in spied.items():
            assert all(s.pending_msgs == 0 for s in subs), role
            assert any("permissions violation" in e.lower() for e in errors[role]), (role, errors[role])
    finally:
        for nc in (admin, *conns.values()):
            await nc.close()
