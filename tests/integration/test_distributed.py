"""Several instances of every server-side role (two gateways, two schedulers, two
verifiers), per-user edges, every mode, and a verifier lost mid-generation — all real
processes over real NATS and Redis, every output exact."""

import asyncio
import json
import shutil
import signal
import uuid

import httpx
import nats
import openai
import pytest
import redis
from transformers import AutoTokenizer

from specedge import state, subjects
from specedge.launcher import free_port
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled
from specedge.protocol import SessionOpen
from tests.helpers import committed_tokens, registered, schedulers_know, start_cli, wait_for
from tests.sessions import collect, open_session, prompt_and_reference

VERIFIER = ["verifier", "--max-len", "1024", "--max-sessions", "8"]
SCHEDULER = ["scheduler", "--edge-timeout", "5", "--verifier-timeout", "5", "--draft-timeout", "3", "--budget", "16",
             "--depth", "3"]


@pytest.fixture(scope="module")
def cluster(servers, tmp_path_factory):
    import os

    nats_url, redis_url = servers["nats_url"], servers["redis_url"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECEDGE_")} | {"PYTHONUNBUFFERED": "1"}
    logs = tmp_path_factory.mktemp("cluster")
    common = ["--nats-url", nats_url]
    specs = {
        "verifier-1": [*VERIFIER, *common, "--redis-url", redis_url],
        "verifier-2": [*VERIFIER, *common, "--redis-url", redis_url],
        "scheduler-1": [*SCHEDULER, *common, "--redis-url", redis_url],
        "scheduler-2": [*SCHEDULER, *common, "--redis-url", redis_url],
        "alice-edge": ["edge-agent", *common, "--user", "alice", "--max-len", "1024"],
        "shared-edge": ["edge-agent", *common, "--max-len", "1024"],
        "server-drafter": ["edge-agent", *common, "--server-side", "--max-len", "1024"],
    }
    ports = [free_port(), free_port(), free_port()]
    for i, port in enumerate(ports):
        specs[f"gateway-{i + 1}"] = ["gateway", *common, "--redis-url", redis_url, "--port", str(port),
                                       "--max-context", "1024"]
    specs["gateway-3"] += ["--max-concurrent-per-key", "1"]
    procs = {name: start_cli(argv, env, logs / f"{name}.log") for name, argv in specs.items()}
    ids = {}
    for name, proc in procs.items():
        role = specs[name][0]
        ids[name] = wait_for(lambda r=role, p=proc: registered(nats_url, r, p.pid), 90, name)[0].instance_id
    key = asyncio.run(create_key(redis_url, "dave"))
    yield {"procs": procs, "ids": ids, "logs": logs, "nats_url": nats_url, "redis_url": redis_url,
           "gateways": [f"http://127.0.0.1:{p}" for p in ports], "key": key}
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    for log in logs.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()


async def create_key(redis_url: str, user: str) -> str:
    async with state.connect_redis(redis_url) as client:
        return await state.ApiKeys(client).create(user)


async def run_sessions(nats_url: str, requests: list[SessionOpen]):
    nc = await nats.connect(nats_url)
    try:
        subs = [await nc.subscribe(subjects.session_tokens(r.session_id)) for r in requests]
        opened = [await open_session(nc, r) for r in requests]
        assert [o.error for o in opened] == [None] * len(requests)
        results = await asyncio.gather(*(collect(sub) for sub in subs))
        return opened, [tokens for tokens, _ in results]
    finally:
        await nc.close()


def scheduler_of(redis_url: str, session_ids: list[str]) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [(client.hget(state.session_key(sid), "scheduler") or b"").decode() for sid in session_ids]
    finally:
        client.close()


async def test_users_get_their_own_edge_and_every_mode_is_exact(cluster):
    ids = cluster["ids"]
    nc = await nats.connect(cluster["nats_url"])
    try:  # every scheduler has heard every edge's heartbeat
        await schedulers_know(nc, edges=sum(1 for role in ids if "edge" in role or "drafter" in role))
    finally:
        await nc.close()
    cases = [("alice", "specedge", "alice-edge"), ("bob", "specedge", "shared-edge"),
             ("bob", "server-only", "server-drafter"), ("alice", "autoregressive", None)]
    prompts = [prompt_and_reference(f"Write a function that parses record {i}.", 24) for i in range(len(cases))]
    requests = [SessionOpen(session_id=uuid.uuid4().hex, tokens=p, max_new_tokens=24, eos_ids=eos, user=user,
                            mode=mode) for (user, mode, _), (p, _, eos) in zip(cases, prompts, strict=True)]
    opened, outputs = await run_sessions(cluster["nats_url"], requests)
    assert [o.edge for o in opened] == [ids[e] if e else None for _, _, e in cases]
    assert outputs == [reference for _, reference, _ in prompts]
    # the sessions' Redis keys are gone once they end: nothing grows without bound
    assert [await committed_tokens(cluster["redis_url"], r.session_id) for r in requests] == [None] * len(cases)


async def test_two_schedulers_and_two_verifiers_share_the_load_without_breaking_a_session(cluster):
    prompts = [prompt_and_reference(f"Write a function that checks input {i}.", 20) for i in range(8)]
    requests = [SessionOpen(session_id=uuid.uuid4().hex, tokens=p, max_new_tokens=20, eos_ids=eos, user="carol")
                for p, _, eos in prompts]
    nc = await nats.connect(cluster["nats_url"])
    subs = [await nc.subscribe(subjects.session_tokens(r.session_id)) for r in requests]
    opened = [await open_session(nc, r) for r in requests]
    owners = scheduler_of(cluster["redis_url"], [r.session_id for r in requests])  # read while they run
    results = await asyncio.gather(*(collect(sub) for sub in subs))
    await nc.close()
    assert [tokens for tokens, _ in results] == [reference for _, reference, _ in prompts]
    assert len({o.verifier for o in opened}) == 2
    assert set(owners) == {cluster["ids"]["scheduler-1"], cluster["ids"]["scheduler-2"]}, owners
    for name in ("scheduler-1", "scheduler-2"):  # each sees only its own sessions' drafts
        assert "unknown_session" not in (cluster["logs"] / f"{name}.log").read_text()


async def test_two_gateways_serve_the_same_users_exactly(cluster):
    client = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=cluster["key"], max_retries=0)
              for url in cluster["gateways"]]
    questions = [f"Write a function that formats date {i}." for i in range(4)]

    async def ask(i: int, question: str) -> str:
        reply = await client[i % 2].chat.completions.create(
            model="specedge-tiny-target", temperature=0, max_tokens=20,
            messages=[{"role": "user", "content": question}])
        return reply.choices[0].message.content

    answers = await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    expected = [tok.decode(prompt_and_reference(q, 20)[1], skip_special_tokens=True) for q in questions]
    assert answers == expected


async def test_too_many_concurrent_requests_for_one_key_get_429_and_the_slot_comes_back(cluster):
    url, key = cluster["gateways"][2], await create_key(cluster["redis_url"], "erin")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "specedge-tiny-target", "max_tokens": 120, "stream": True,
            "messages": [{"role": "user", "content": "Explain sorting algorithms with code."}]}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.aiter_lines()
            assert (await anext(lines)).startswith("data: ")  # generating now
            second = await client.post("/v1/chat/completions", json={**body, "stream": False})
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "rate_limit_exceeded"
            async for _ in lines:
                pass
        client_redis = redis.Redis.from_url(cluster["redis_url"])
        try:
            assert wait_for(lambda: not client_redis.exists(state.active_key("erin")), 10, "the slot to come back")
        finally:
            client_redis.close()
        third = await client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 8})
        assert third.status_code == 200


async def test_an_edge_with_another_tokenizer_is_told_and_stops(cluster, tmp_path):
    alien = tmp_path / "alien-draft"
    shutil.copytree(bundled(BUNDLED_DRAFT), alien)
    tokenizer = json.loads((alien / "tokenizer.json").read_text())
    top = max(t["id"] for t in tokenizer["added_tokens"])
    tokenizer["added_tokens"].append({"id": top + 1, "content": "<|alien|>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    (alien / "tokenizer.json").write_text(json.dumps(tokenizer))
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECEDGE_")}
    log_path = tmp_path / "alien.log"
    proc = start_cli(["edge-agent", "--nats-url", cluster["nats_url"], "--draft", str(alien)], env, log_path)
    assert await asyncio.to_thread(proc.wait, 90) == 2, log_path.read_text()
    assert "tokenizer" in log_path.read_text() and "refused by the server side" in log_path.read_text()


async def test_a_verifier_killed_mid_generation_resumes_on_the_other_from_committed_tokens(cluster):
    prompt, reference, eos = prompt_and_reference("Explain how to reverse a linked list, with code.", 120)
    request = SessionOpen(session_id=uuid.uuid4().hex, tokens=prompt, max_new_tokens=120, eos_ids=eos, user="bob")
    nc = await nats.connect(cluster["nats_url"])
    sub = await nc.subscribe(subjects.session_tokens(request.session_id))
    opened = await open_session(nc, request)
    victim = next(name for name, i in cluster["ids"].items() if i == opened.verifier)
    survivor = "verifier-2" if victim == "verifier-1" else "verifier-1"
    tokens, events = await collect(sub, on_first=lambda: cluster["procs"][victim].kill())
    await nc.close()
    assert tokens == reference  # nothing lost, nothing repeated (collect checks every index)
    assert "re-prefilled from" in (cluster["logs"] / f"{survivor}.log").read_text()
