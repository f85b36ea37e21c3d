"""Redis that survives its primary: a primary, a replica and three Sentinels from the same
`redis-server` binary; every service finds the primary through the Sentinels. Killing the
primary (SIGKILL: a lost machine) in the middle of a streamed generation promotes the
replica, and the client still gets exactly the target's output: every commit was on the
replica before it counted (`WAIT`), so none is lost."""

import asyncio
import signal

import openai
import redis
from transformers import AutoTokenizer

from specedge.launcher import LOOPBACK, SENTINEL_SERVICE, Launcher, free_port
from specedge.models import BUNDLED_TARGET, bundled
from specedge.state import sentinel_of
from tests.helpers import registered, start_cli, stop_all, wait_for
from tests.sessions import prompt_and_reference


def primary_port(sentinel_url: str) -> int | None:
    hosts, service, _ = sentinel_of(sentinel_url)
    host, port = hosts[0]
    found = redis.Redis(host=host, port=port, socket_timeout=2).sentinel_get_master_addr_by_name(service)
    return int(found[1]) if found else None


async def test_the_primary_lost_mid_generation_loses_no_committed_token(nats_url, cli_env, tmp_path):
    with Launcher() as launcher:
        (primary, replica, *_), url = launcher.start_redis_ha()
        assert primary_port(url) == primary.port and SENTINEL_SERVICE in url
        port = free_port()
        common = ["--nats-url", nats_url, "--redis-url", url]
        procs = {
            "verifier": start_cli(["verifier", *common, "--max-len", "1024"], cli_env, tmp_path / "verifier.log"),
            "scheduler": start_cli(["scheduler", *common], cli_env, tmp_path / "scheduler.log"),
            "edge-agent": start_cli(["edge-agent", "--nats-url", nats_url, "--max-len", "1024"], cli_env,
                                    tmp_path / "edge.log"),
            "gateway": start_cli(["gateway", *common, "--port", str(port), "--no-api-key", "--max-context", "1024"],
                                 cli_env, tmp_path / "gateway.log"),
        }
        try:
            for role, proc in procs.items():
                await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(nats_url, r, p.pid), 90, role)
            question = "Explain what a hash map is."
            _, reference, _ = prompt_and_reference(question, 48)
            tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
            client = openai.AsyncOpenAI(base_url=f"http://{LOOPBACK}:{port}/v1", api_key="none", max_retries=0,
                                        timeout=120)
            stream = await client.chat.completions.create(
                model=BUNDLED_TARGET, messages=[{"role": "user", "content": question}], max_tokens=48,
                temperature=0, stream=True)
            pieces = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 1:
                        primary.process.send_signal(signal.SIGKILL)  # the primary's machine is gone
            assert "".join(pieces) == tok.decode(reference, skip_special_tokens=True)
            assert primary_port(url) == replica.port  # the Sentinels promoted the replica
            assert all(p.poll() is None for p in procs.values())
        finally:
            stop_all(procs, tmp_path)
        # the failover happened while the session ran: commits were refused, then went on
        assert "state_unavailable" in (tmp_path / "verifier.log").read_text()
