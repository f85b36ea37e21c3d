"""The message plane on a three-node NATS cluster (routes on loopback): every service is
given all three nodes' URLs; killing the node the scheduler is connected to, in the middle
of a streamed generation, costs a reconnection — what the client gets is still exactly the
target's output (the gateway fills what was lost in transit from Redis)."""

import asyncio
import json
import urllib.request

import openai
from transformers import AutoTokenizer

from specedge import bus
from specedge.launcher import Launcher, cluster_url, free_port
from specedge.models import BUNDLED_TARGET, bundled
from specedge.nats_auth import edge_identity, service_identity
from specedge.state import ApiKeys, connect_redis
from tests.helpers import registered, scrape, start_cli, start_on_accounts, stop_all, wait_for
from tests.sessions import prompt_and_reference


def connections(monitor: int) -> set[str]:
    """The names of the clients connected to one node (its monitoring endpoint)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz?limit=1000", timeout=5) as response:
        return {c.get("name", "") for c in json.load(response).get("connections", [])}


async def test_services_survive_the_loss_of_the_schedulers_nats_node(cli_env, tmp_path):
    with Launcher() as launcher:
        auth = launcher.nats_auth
        alice = auth.add(edge_identity("alice-laptop", user="alice"))
        nodes = launcher.start_nats_cluster(3)
        url, redis_url = bus.without_login(cluster_url(nodes)), launcher.start_redis().url
        env = {**cli_env, "SPECEDGE_REQUEST_TIMEOUT": "5"}
        metrics_port = free_port()
        procs = start_on_accounts({"auth": auth, "url": url, "alice": alice}, redis_url, metrics_port, tmp_path, env)
        port = free_port()
        procs["gateway"] = start_cli(["gateway", "--nats-url", url, "--credentials",
                                      str(auth.credentials_path(service_identity("gateway").nats_user)),
                                      "--redis-url", redis_url, "--port", str(port), "--max-context", "1024"],
                                     env, tmp_path / "gateway.log")
        try:
            admin = cluster_url(nodes)
            for role, proc in procs.items():
                await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(admin, r, None) and
                                        p.poll() is None, 90, role)
            scheduler = (await asyncio.to_thread(registered, admin, "scheduler"))[0].instance_id
            victim = next(n for n in nodes if scheduler in connections(n.monitor))
            question = "Explain what a hash map is."
            _, reference, _ = prompt_and_reference(question, 48)
            tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
            async with connect_redis(redis_url) as redis:
                key = await ApiKeys(redis).create("alice")  # her requests are drafted on her own edge
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                                        timeout=120)
            stream = await client.chat.completions.create(
                model=BUNDLED_TARGET, messages=[{"role": "user", "content": question}], max_tokens=48,
                temperature=0, stream=True, extra_body={"specedge": {"mode": "specedge"}})
            pieces = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 1:
                        await asyncio.to_thread(victim.stop)  # the scheduler's node dies mid-way
            assert "".join(pieces) == tok.decode(reference, skip_special_tokens=True)
            drafted = scrape(f"http://127.0.0.1:{metrics_port}/metrics")["specedge:spec_decode_num_draft_tokens_total"]
            assert drafted > 0  # alice's edge drafted for her
            assert not victim.alive() and all(p.poll() is None for p in procs.values())
            assert scheduler in set().union(*(connections(n.monitor) for n in nodes if n is not victim))
        finally:
            stop_all(procs, tmp_path)
    assert "reconnected" in (tmp_path / "scheduler.log").read_text()
