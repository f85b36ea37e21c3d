"""`specedge up` end to end: servers and four services come up, register, serve, and Ctrl-C
leaves no process behind."""

import json
import os
import pathlib
import re
import signal
import subprocess

import httpx
import openai
import psutil
import pytest

from specedge import bus
from tests.conftest import SPECEDGE
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

READY = re.compile(r"gateway (http://\S+) .*API key (\S+) ;.*nats (nats://\S+);.*NATS accounts in (\S+) ")


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_up_runs_everything_and_ctrl_c_stops_everything(cli_env, tmp_path):
    log_path = tmp_path / "up.log"
    # Its own process group, so that SIGINT to the group is exactly a terminal's Ctrl-C.
    proc = subprocess.Popen([*SPECEDGE, "up", "--port", "0"], env=cli_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=open(log_path, "wb"), text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()  # blocks until the ready line (or exit)
        match = READY.search(line)
        assert match, f"no ready line; stdout={line!r}\n{log_path.read_text()}"
        gateway, key, nats_url, accounts = match.groups()
        assert ":***@" in nats_url  # the admin's password is not printed
        children = descendants(proc.pid)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for part in ("nats-server", "redis-server", " gateway ", " scheduler ", " verifier ", " edge-agent "):
            assert part in names + " ", part
        for child in children:  # every service logs in with its own account
            if "specedge.cli" in child.cmdline():
                assert "--credentials" in child.cmdline(), child.cmdline()

        admin = pathlib.Path(accounts) / "specedge-admin.creds.json"
        status = subprocess.run([*SPECEDGE, "status", "--nats-url", bus.without_login(nats_url),
                                 "--credentials", str(admin), "--json"], env=cli_env,
                                capture_output=True, text=True, timeout=60)
        roles = sorted(s["role"] for s in json.loads(status.stdout))
        # two shared-pool edges and the server-side drafter
        assert roles == ["edge-agent"] * 3 + ["gateway", "scheduler", "verifier"], status.stderr

        assert httpx.get(f"{gateway}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key)
        assert [m.id for m in client.models.list()] == ["specedge-tiny-target"]
    except BaseException:
        proc.kill()
        raise

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=60) == 0, log_path.read_text()
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
             10, "every child to exit")
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text
    assert log_text.count("left the registry") == 6, log_text  # gateway, scheduler, verifier, 2 edges, drafter


def test_up_with_external_servers_starts_only_the_services(nats_url, redis_url, cli_env, tmp_path):
    log_path = tmp_path / "up.log"
    proc = subprocess.Popen([*SPECEDGE, "up", "--port", "0", "--nats-url", nats_url, "--redis-url", redis_url],
                            env=cli_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=open(log_path, "wb"), text=True)
    try:
        line = proc.stdout.readline()
        assert bus.redact(nats_url) in line, log_path.read_text()
        names = " ".join(" ".join(c.cmdline()) for c in descendants(proc.pid))
        assert "nats-server" not in names and "redis-server" not in names
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()


def test_up_refuses_a_busy_port_with_a_clear_message(cli_env):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([*SPECEDGE, "up", "--port", str(port)], env=cli_env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in done.stderr and "Traceback" not in done.stderr


def test_up_with_a_nats_cluster_and_redis_with_sentinels_serves(cli_env):
    """`--nats-nodes 3 --redis-ha`: three nats-servers routed to each other, Redis with a
    replica and Sentinels, every service given all NATS URLs and the Sentinels (the start-up
    line names them), and a request served through them."""
    from tests.helpers import discover, specedge_up

    with specedge_up("--nats-nodes", "3", "--redis-ha", "--edges", "1", "--no-server-drafter") as stack:
        assert stack.redis_url.startswith("redis+sentinel://") and stack.redis_url.endswith("/specedge/0")
        urls = bus.servers(stack.nats_url)
        assert len({u.rsplit(":", 1)[1] for u in urls}) == 3
        for url in urls:  # each node alone sees every service: one cluster
            assert {a.role for a in discover(url)} == {"gateway", "scheduler", "verifier", "edge-agent"}
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0)
        reply = client.chat.completions.create(model="specedge-tiny-target", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Sort a list."}])
        assert reply.usage.completion_tokens == 8
