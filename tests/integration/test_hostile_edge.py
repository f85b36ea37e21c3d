"""A hostile edge: it registers like any edge, takes sessions, and answers every result with
garbage bytes, out-of-vocabulary ids, cyclic and oversized trees, stale and replayed
cycles, trees for sessions that are not its own, trees "sent ahead" on made-up outcomes,
and random trees. Every session's output
is still exactly the target's greedy decoding; bad messages are refused and counted until
the edge is cut off; no service crashes."""

import asyncio
import random
import signal
import uuid

import nats
from transformers import AutoTokenizer

from specedge import protocol, registry, subjects
from specedge.launcher import free_port
from specedge.models import BUNDLED_DRAFT, bundled, tokenizer_fingerprint
from specedge.protocol import DraftAssign, DraftTreeMsg, ServiceAnnouncement, SessionOpen, VerifyResult
from tests.helpers import registered, schedulers_know, scrape, start_cli, wait_for
from tests.sessions import collect, open_session, prompt_and_reference


async def hostile_edge(nc, fingerprint: str, stop: asyncio.Event, sent: dict[str, int]) -> str:
    me = ServiceAnnouncement(role="edge-agent", instance_id=registry.new_instance_id("edge-agent"), name="evil",
                             version="evil", heartbeat_s=1.0,
                             details={"max_sessions": "8", "pool": "shared", "tokenizer_fingerprint": fingerprint})
    rng = random.Random(7)
    scheduler_of: dict[str, str] = {}
    last: dict[str, DraftTreeMsg] = {}

    async def attack(sid: str, cycle: int, committed_len: int) -> None:
        edge, scheduler = me.instance_id, scheduler_of[sid]
        out = subjects.drafts(edge, scheduler)
        others = [s for s in scheduler_of if s != sid]

        def tree(tokens, parents, **kw):
            fields = {"session_id": sid, "cycle": cycle, "committed_len": committed_len, **kw}
            return protocol.encode(DraftTreeMsg(tokens=tokens, parents=parents, **fields))

        bad = [
            ("garbage", b"\xc1\xff not msgpack"),
            ("oov", tree([10**9], [-1])),
            ("cyclic", tree([5, 6, 7], [-1, 2, 1])),
            ("oversized", tree([5] * 600, [-1] * 600)),
            ("stale", tree([5], [-1], cycle=cycle + 5)),
            ("wrong_length", tree([5, 6], [-1])),
        ]
        if others:  # a tree for a session that is not this one's (and not at its cycle)
            bad.append(("other_session", tree([5], [-1], session_id=rng.choice(others))))
        if sid in last:  # replay the previous cycle's tree
            bad.append(("replay", protocol.encode(last[sid])))
        for name, data in bad:
            await nc.publish(out, data)
            sent[name] = sent.get(name, 0) + 1
        nodes = rng.randint(0, 12)
        valid = DraftTreeMsg(session_id=sid, cycle=cycle, committed_len=committed_len,
                             tokens=[rng.randrange(1000) for _ in range(nodes)],
                             parents=[rng.randint(-1, i - 1) for i in range(nodes)])
        last[sid] = valid
        await nc.publish(out, protocol.encode(valid))
        # Trees "sent ahead" on lies: a made-up outcome, a far cycle, an enormous assumption.
        guess = [rng.randrange(1000) for _ in range(rng.randint(1, 4))]
        for name, cycles_on, assumed in (("ahead_lie", 1, guess), ("ahead_far", 7, guess),
                                         ("ahead_huge", 1, [5] * 5000)):
            await nc.publish(out, tree([5, 6], [-1, 0], cycle=cycle + cycles_on,
                                       committed_len=committed_len + len(assumed), assumed=assumed))
            sent[name] = sent.get(name, 0) + 1

    async def on_assign(msg) -> None:
        assign = protocol.decode(msg.data, DraftAssign)
        scheduler_of[assign.session_id] = assign.scheduler
        await attack(assign.session_id, 0, len(assign.tokens))

    async def on_result(msg) -> None:
        result = protocol.decode(msg.data, VerifyResult)
        await attack(result.session_id, result.cycle + 1, result.committed_len + len(result.accepted) + 1)

    await nc.subscribe(subjects.edge_assign(me.instance_id), cb=on_assign)
    await nc.subscribe(subjects.edge_result(me.instance_id), cb=on_result)

    async def heartbeat() -> None:
        while not stop.is_set():
            await nc.publish(registry.announce_subject(me), protocol.encode(me))
            await asyncio.sleep(0.5)

    asyncio.get_running_loop().create_task(heartbeat())
    return me.instance_id


async def test_a_hostile_edge_cannot_change_any_output_or_crash_anything(nats_url, redis_url, cli_env, tmp_path):
    metrics_port = free_port()
    procs = {
        "verifier": start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "1024"],
                              cli_env, tmp_path / "verifier.log"),
        "scheduler": start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url,
                                "--metrics-port", str(metrics_port)], cli_env, tmp_path / "scheduler.log"),
    }
    stop = asyncio.Event()
    try:
        for role, proc in procs.items():
            await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(nats_url, r, p.pid), 60, role)
        cases = [prompt_and_reference(f"Write a function that validates input {i}.", 32) for i in range(3)]
        fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(bundled(BUNDLED_DRAFT)))
        nc = await nats.connect(nats_url)
        sent: dict[str, int] = {}
        evil = await hostile_edge(nc, fingerprint, stop, sent)
        cut_off: list[protocol.EdgeRefused] = []

        async def on_refused(msg) -> None:
            cut_off.append(protocol.decode(msg.data, protocol.EdgeRefused))

        await nc.subscribe(subjects.edge_refused(evil), cb=on_refused)
        await schedulers_know(nc, edges=1)  # the scheduler has heard the hostile edge
        sids = [uuid.uuid4().hex for _ in cases]
        subs = [await nc.subscribe(subjects.session_tokens(sid)) for sid in sids]
        opened = [await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=32, eos_ids=eos))
                  for sid, (ids, _, eos) in zip(sids, cases, strict=True)]
        assert [o.edge for o in opened] == [evil] * 3  # the hostile edge drafts for every session
        results = await asyncio.gather(*(collect(sub) for sub in subs))
        assert [tokens for tokens, _ in results] == [reference for _, reference, _ in cases]
        assert all(p.poll() is None for p in procs.values())  # nothing crashed
        refused = {k: v for k, v in scrape(f"http://127.0.0.1:{metrics_port}/metrics").items()
                   if k.startswith("specedge:rejected_messages_total")}
        reasons = {k.split("reason=")[1].rstrip("}") for k in refused}
        assert {"malformed", "stale_cycle"} <= reasons, reasons
        # past the offence limit the edge is cut off: told so, and its drafts no longer reach the scheduler
        assert scrape(f"http://127.0.0.1:{metrics_port}/metrics")["specedge:edges_cut_off_total"] == 1
        assert [r.reason for r in cut_off] == ["cut_off"]
        assert 50 <= sum(refused.values()) < sum(sent.values())
        stop.set()
        await nc.close()
    finally:
        stop.set()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    for log in tmp_path.glob("*.log"):
        text = log.read_text()
        assert "Traceback" not in text, text
        assert "Write a function" not in text  # refusals are logged without prompt contents
