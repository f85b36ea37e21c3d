"""The launcher starts real servers, they work, and stopping leaves nothing behind."""

import asyncio
import contextlib
import os
import pathlib
import sys
import time

import nats
import psutil
import pytest
import redis

from specedge.bus import without_login
from specedge.launcher import Launcher, LauncherError, embedded_servers, find_nats_server, find_redis_server


def test_binaries_come_from_the_install_step():
    assert os.access(find_nats_server(), os.X_OK)
    assert os.access(find_redis_server(), os.X_OK)


def test_servers_start_healthy_work_and_stop_cleanly():
    with Launcher() as launcher:
        nats_child = launcher.start_nats()
        redis_child = launcher.start_redis()
        pids = [nats_child.pid, redis_child.pid]
        workdir = launcher.workdir
        assert nats_child.url.startswith("nats://specedge-admin:") and "@127.0.0.1:" in nats_child.url

        r = redis.Redis.from_url(redis_child.url)
        r.set("k", "v")
        assert r.get("k") == b"v"
        r.close()

        async def nats_round_trip() -> bytes:
            nc = await nats.connect(nats_child.url)
            sub = await nc.subscribe("t")
            await nc.publish("t", b"hello")
            msg = await sub.next_msg(timeout=2)
            await nc.close()
            return msg.data

        assert asyncio.run(nats_round_trip()) == b"hello"

        async def anonymous() -> None:  # authentication is on: no login, no connection
            await nats.connect(without_login(nats_child.url), allow_reconnect=False, connect_timeout=2)

        with pytest.raises(nats.errors.Error, match="[Aa]uthorization"):
            asyncio.run(anonymous())
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not pathlib.Path(workdir).exists()


def test_given_urls_are_used_and_nothing_is_started(nats_url, redis_url):
    with embedded_servers(nats_url, redis_url) as (n, r, launcher):
        assert (n, r) == (nats_url, redis_url)
        assert launcher.children == []


def test_a_child_that_ignores_sigterm_is_killed(tmp_path):
    ready = tmp_path / "ready"
    script = (f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"open({str(ready)!r}, 'w').close(); time.sleep(60)")
    with Launcher() as launcher:
        child = launcher.spawn("stubborn", [sys.executable, "-c", script], quiet=True)
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        code = child.stop(grace_s=0.5)
    assert code == -9


def test_missing_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("specedge.launcher._venv_bin", lambda: pathlib.Path("/nonexistent"))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LauncherError, match="nats-server not found"):
        find_nats_server()


def test_a_nats_cluster_routes_every_node_and_a_client_survives_the_loss_of_its_node():
    """`start_nats_cluster`: three nodes routed to each other; a client given every node's
    URL (`bus.connect` with `cluster_url`) reconnects to a survivor when its node dies, and
    messages flow again between clients on different nodes."""
    from specedge import bus
    from specedge.launcher import cluster_url

    with Launcher() as launcher:
        nodes = launcher.start_nats_cluster(3)

        async def lose_a_node() -> list[bytes]:
            # a on node 1 or 2 (it learns of node 3 from the cluster too), b on node 3
            async with bus.connect(cluster_url(nodes[:2]), "a") as a, bus.connect(nodes[2].url, "b") as b:
                sub = await b.subscribe("t")
                await b.flush()
                clock = asyncio.get_running_loop().time

                async def delivered(payload: bytes) -> bytes | None:
                    """Publish until b has it: b's interest crosses the routes asynchronously."""
                    deadline = clock() + 10
                    while clock() < deadline:
                        await a.publish("t", payload)
                        with contextlib.suppress(nats.errors.TimeoutError):
                            while (await sub.next_msg(timeout=0.5)).data != payload:
                                pass  # an earlier copy
                            return payload
                    return None

                got = [await delivered(b"before")]
                victim = next(n for n in nodes if n.port == a.connected_url.port)
                victim.stop()
                deadline = clock() + 10
                while not (a.is_connected and a.connected_url.port != victim.port):
                    assert clock() < deadline, "no reconnection to a survivor"
                    await asyncio.sleep(0.05)
                got.append(await delivered(b"after"))
                return got

        assert asyncio.run(lose_a_node()) == [b"before", b"after"]
