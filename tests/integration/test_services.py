"""Each service, started alone through the real CLI, connects, registers, and stops cleanly."""

import asyncio
import signal
import subprocess

import httpx
import nats
import pytest

from specedge import registry, subjects
from specedge.launcher import free_port
from specedge.protocol import ServiceLeave, decode
from tests.helpers import discover, registered, start_cli, wait_for

ROLE_ARGS = {
    "scheduler": lambda n, r: ["scheduler", "--nats-url", n, "--redis-url", r],
    "verifier": lambda n, r: ["verifier", "--nats-url", n, "--redis-url", r],
    "edge-agent": lambda n, r: ["edge-agent", "--nats-url", n],
    "gateway": lambda n, r: ["gateway", "--nats-url", n, "--redis-url", r, "--port", str(free_port())],
}


def stop(proc: subprocess.Popen, log_path) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"did not stop on SIGTERM:\n{log_path.read_text()}") from None


@pytest.mark.parametrize("role", list(ROLE_ARGS))
def test_service_registers_and_stops_cleanly(role, nats_url, redis_url, cli_env, tmp_path):
    log_path = tmp_path / f"{role}.log"
    proc = start_cli(ROLE_ARGS[role](nats_url, redis_url), cli_env, log_path)
    try:
        ann = wait_for(lambda: registered(nats_url, role, proc.pid), 60, f"{role} to register")[0]
    except AssertionError:
        proc.kill()
        raise AssertionError(log_path.read_text()) from None
    if role in ("verifier", "edge-agent"):
        assert ann.details["model"] in ("specedge-tiny-target", "specedge-tiny-draft")
        assert len(ann.details["tokenizer_fingerprint"]) == 16
    assert stop(proc, log_path) == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
    assert not registered(nats_url, role, proc.pid)


def test_flags_read_from_environment(nats_url, cli_env, tmp_path):
    env = {**cli_env, "SPECEDGE_NATS_URL": nats_url, "SPECEDGE_NAME": "edge-from-env", "SPECEDGE_MAX_SESSIONS": "7"}
    log_path = tmp_path / "edge.log"
    proc = start_cli(["edge-agent"], env, log_path)
    ann = wait_for(lambda: registered(nats_url, "edge-agent", proc.pid), 60, "edge agent")[0]
    assert (ann.name, ann.details["max_sessions"]) == ("edge-from-env", "7")
    assert stop(proc, log_path) == 0


async def test_leave_is_published_on_sigterm(nats_url, redis_url, cli_env, tmp_path):
    nc = await nats.connect(nats_url)
    leaves = await nc.subscribe(subjects.REGISTRY_LEAVE_ALL)
    await nc.flush()
    log_path = tmp_path / "scheduler.log"
    proc = start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url], cli_env, log_path)
    await asyncio.to_thread(wait_for, lambda: registered(nats_url, "scheduler", proc.pid), 60, "scheduler")
    proc.send_signal(signal.SIGTERM)
    leave = decode((await leaves.next_msg(timeout=20)).data, ServiceLeave)
    assert leave.role == "scheduler" and f"-{proc.pid}-" in leave.instance_id
    assert await asyncio.to_thread(proc.wait, 20) == 0
    await nc.close()


def test_unreachable_redis_is_a_clear_startup_error(nats_url, cli_env, tmp_path):
    log_path = tmp_path / "scheduler.log"
    proc = start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
                     cli_env, log_path)
    assert proc.wait(timeout=60) == 2
    text = log_path.read_text()
    assert "cannot start: cannot reach Redis" in text and "Traceback" not in text


def test_bad_model_path_is_a_clear_startup_error(nats_url, redis_url, cli_env, tmp_path):
    log_path = tmp_path / "verifier.log"
    proc = start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--target", "/no/such/model"],
                     cli_env, log_path)
    assert proc.wait(timeout=60) == 2
    text = log_path.read_text()
    assert "model path '/no/such/model' does not exist" in text and "Traceback" not in text


def test_unreachable_nats_is_a_clear_startup_error(redis_url, cli_env, tmp_path):
    log_path = tmp_path / "scheduler.log"
    proc = start_cli(["scheduler", "--nats-url", f"nats://127.0.0.1:{free_port()}", "--redis-url", redis_url,
                      "--nats-wait", "3"], cli_env, log_path)
    assert proc.wait(timeout=90) == 2
    assert "cannot reach NATS" in log_path.read_text() and "waited 3" in log_path.read_text()


def test_a_max_context_too_large_for_the_bus_is_a_clear_startup_error(nats_url, redis_url, cli_env, tmp_path):
    """A prompt of --max-context tokens could not travel in one NATS message (1 MiB here)."""
    log_path = tmp_path / "gateway.log"
    proc = start_cli(["gateway", "--nats-url", nats_url, "--redis-url", redis_url, "--port", str(free_port()),
                      "--max-context", "1000000"], cli_env, log_path)
    assert proc.wait(timeout=90) == 2
    assert "max_payload" in log_path.read_text()


def test_gateway_health_is_503_until_a_verifier_registers(nats_url, redis_url, cli_env, tmp_path):
    """Also: a verifier that starts after the gateway with a shorter --max-len than its
    --max-context answers a longer prompt with a clear 400, not a 429 after evicting others."""
    port = free_port()
    gw = start_cli(["gateway", "--nats-url", nats_url, "--redis-url", redis_url, "--port", str(port), "--no-api-key"],
                   cli_env, tmp_path / "gw.log")
    try:
        wait_for(lambda: registered(nats_url, "gateway", gw.pid), 60, "gateway")
        assert not [a for a in discover(nats_url) if a.role == "verifier"]
        r = httpx.get(f"http://127.0.0.1:{port}/health")
        assert r.status_code == 503
        ver = start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "64"], cli_env,
                        tmp_path / "v.log")
        sched = start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url], cli_env,
                          tmp_path / "s.log")
        try:
            wait_for(lambda: registered(nats_url, "verifier", ver.pid), 60, "verifier")
            r = httpx.get(f"http://127.0.0.1:{port}/health")
            assert r.status_code == 200 and r.json()["verifiers"] == 1
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
            assert [m["id"] for m in models["data"]] == ["specedge-tiny-target"]
            wait_for(lambda: registered(nats_url, "scheduler", sched.pid), 60, "scheduler")
            body = {"model": "specedge-tiny-target", "prompt": " the" * 100, "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            assert "--max-len" in r.json()["error"]["message"]
            body["prompt"] = " the" * 20
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        finally:
            assert stop(sched, tmp_path / "s.log") == 0
            assert stop(ver, tmp_path / "v.log") == 0
    finally:
        assert stop(gw, tmp_path / "gw.log") == 0


def test_edge_agent_waits_for_nats_forever_and_still_stops_at_once(cli_env, tmp_path):
    log_path = tmp_path / "edge.log"
    proc = start_cli(["edge-agent", "--nats-url", f"nats://127.0.0.1:{free_port()}"], cli_env, log_path)
    wait_for(lambda: "errors so far" in log_path.read_text(), 60, "the edge agent to try NATS")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "stopped during startup" in log_path.read_text()


async def test_a_max_context_longer_than_every_verifier_holds_is_a_clear_startup_error(
        nats_url, redis_url, cli_env, tmp_path):
    """Verifiers already up announce their --max-len; a gateway whose --max-context none of
    them can hold refuses to start (one that starts before them cannot check: a longer
    prompt is then a 400 `context_length_exceeded`, evicting nobody)."""
    log_path = tmp_path / "gateway.log"
    nc = await nats.connect(nats_url)
    short = registry.announcement("verifier", "short", max_len="512", max_sessions="4")
    async with registry.presence(nc, short):
        proc = start_cli(["gateway", "--nats-url", nats_url, "--redis-url", redis_url, "--port", str(free_port()),
                          "--max-context", "4096"], cli_env, log_path)
        assert await asyncio.to_thread(proc.wait, 90) == 2
    await nc.close()
    text = log_path.read_text()
    assert "--max-context 4096 is more than any verifier holds" in text and "Traceback" not in text
