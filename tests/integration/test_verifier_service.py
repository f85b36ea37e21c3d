"""A real verifier process over real NATS: prefill and verify requests from a stand-in
scheduler/edge give exactly the target's output; bad input is refused, never fatal."""

import asyncio
import signal

import nats
import pytest
from transformers import AutoModelForCausalLM

from specedge import protocol, subjects
from specedge.engine.parties import Drafter
from specedge.engine.tree import TreeParams
from specedge.models import BUNDLED_DRAFT, bundled
from specedge.protocol import (
    CloseSession,
    DraftTreeMsg,
    PrefillReply,
    PrefillRequest,
    VerifyBatchReply,
    VerifyBatchRequest,
)
from tests.helpers import committed_tokens, record_session, registered, start_cli, wait_for
from tests.sessions import prompt_and_reference


@pytest.fixture
def verifier(nats_url, redis_url, cli_env, tmp_path):
    log_path = tmp_path / "verifier.log"
    proc = start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-sessions", "4",
                      "--max-len", "512"], cli_env, log_path)
    ann = wait_for(lambda: registered(nats_url, "verifier", proc.pid), 60, "the verifier")[0]
    yield ann.instance_id, log_path
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log_path.read_text()


async def request(nc, subject: str, message, reply_type):
    reply = await nc.request(subject, protocol.encode(message), timeout=30)
    return protocol.decode(reply.data, reply_type)


def drafter() -> Drafter:
    return Drafter(AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_DRAFT)).eval(),
                   TreeParams(budget=16, depth=3, branch=4, beams=8))


async def test_speculative_decoding_over_nats_matches_transformers(verifier, nats_url, redis_url):
    instance, log_path = verifier
    prompt, reference, _ = prompt_and_reference("Parse a date string.", 32)
    edge = drafter()
    edge.open("s1", prompt)
    await record_session(redis_url, "s1", prompt)
    nc = await nats.connect(nats_url)
    opened = await request(nc, subjects.verifier_prefill(instance), PrefillRequest(session_id="s1", tokens=prompt),
                           PrefillReply)
    assert (opened.error, opened.committed_len) == (None, len(prompt))
    output = []
    while len(output) < 32:
        tree = edge.draft("s1")
        reply = await request(nc, subjects.verifier_verify(instance),
                              VerifyBatchRequest(batch_id=f"b{tree.cycle}", trees=[tree]), VerifyBatchReply)
        assert reply.rejected == [] and len(reply.results) == 1
        edge.on_result(reply.results[0])
        output += [*reply.results[0].accepted, reply.results[0].bonus]
    assert output[:32] == reference[:32]
    assert await committed_tokens(redis_url, "s1") == prompt + output  # every cycle committed once
    await nc.close()


async def test_evicted_sessions_are_re_prefilled_from_redis_and_replays_never_commit_twice(
        verifier, nats_url, redis_url):
    instance, log_path = verifier
    prompt, reference, _ = prompt_and_reference("Merge two sorted lists.", 40)
    edge = drafter()
    edge.open("r", prompt)
    await record_session(redis_url, "r", prompt)  # recorded, never prefilled here
    nc = await nats.connect(nats_url)
    output, replays = [], 0
    while len(output) < 40:
        tree = edge.draft("r")
        if tree.cycle % 3 == 2:  # drop the cache now and then: the verifier must rebuild it
            await nc.publish(subjects.verifier_close(instance), protocol.encode(CloseSession(session_id="r")))
        verify = VerifyBatchRequest(batch_id=f"b{tree.cycle}", trees=[tree])
        reply = await request(nc, subjects.verifier_verify(instance), verify, VerifyBatchReply)
        assert reply.rejected == [] and len(reply.results) == 1
        if tree.cycle % 4 == 1:  # the scheduler lost the reply and sends the same tree again
            again = await request(nc, subjects.verifier_verify(instance), verify, VerifyBatchReply)
            assert again.results == reply.results
            replays += 1
        edge.on_result(reply.results[0])
        output += [*reply.results[0].accepted, reply.results[0].bonus]
    assert output[:40] == reference
    assert replays and await committed_tokens(redis_url, "r") == prompt + output
    text = log_path.read_text()
    assert text.count("re-prefilled from") >= 2
    # a tree for a cycle that is already committed, once the verifier no longer holds the
    # session, is refused: the durable state is ahead of it
    await nc.publish(subjects.verifier_close(instance), protocol.encode(CloseSession(session_id="r")))
    stale = DraftTreeMsg(session_id="r", cycle=0, committed_len=len(prompt), tokens=[], parents=[])
    reply = await request(nc, subjects.verifier_verify(instance), VerifyBatchRequest(batch_id="z", trees=[stale]),
                          VerifyBatchReply)
    assert [r.reason for r in reply.rejected] == ["stale_cycle"]
    assert await committed_tokens(redis_url, "r") == prompt + output
    await nc.close()


async def test_bad_messages_are_refused_with_reasons_and_the_service_lives_on(verifier, nats_url, redis_url):
    instance, log_path = verifier
    nc = await nats.connect(nats_url)
    garbage = await nc.request(subjects.verifier_verify(instance), b"\xc1garbage", timeout=10)
    assert protocol.decode(garbage.data, VerifyBatchReply).rejected[0].reason == "malformed"
    bad_prompt = await request(nc, subjects.verifier_prefill(instance),
                               PrefillRequest(session_id="x", tokens=[10**9]), PrefillReply)
    assert bad_prompt.error == "bad_prompt"
    await record_session(redis_url, "s", [5, 6, 7])
    ok = await request(nc, subjects.verifier_prefill(instance), PrefillRequest(session_id="s", tokens=[5, 6, 7]),
                       PrefillReply)
    assert ok.error is None
    bad = {
        "unknown_session": DraftTreeMsg(session_id="ghost", cycle=0, committed_len=3, tokens=[1], parents=[-1]),
        "stale_cycle": DraftTreeMsg(session_id="s", cycle=7, committed_len=3, tokens=[1], parents=[-1]),
        "parent_not_before_child": DraftTreeMsg(session_id="s", cycle=0, committed_len=3, tokens=[1, 2],
                                                parents=[-1, 1]),
        "token_out_of_vocab": DraftTreeMsg(session_id="s", cycle=0, committed_len=3, tokens=[99999], parents=[-1]),
    }
    for reason, tree in bad.items():
        reply = await request(nc, subjects.verifier_verify(instance), VerifyBatchRequest(batch_id="b", trees=[tree]),
                              VerifyBatchReply)
        assert ([r.reason for r in reply.rejected], reply.results) == ([reason], [])
    twice = VerifyBatchRequest(batch_id="d", trees=[bad["stale_cycle"], bad["stale_cycle"]])
    reply = await request(nc, subjects.verifier_verify(instance), twice, VerifyBatchReply)
    assert [r.reason for r in reply.rejected] == ["stale_cycle", "duplicate_session"]
    good = DraftTreeMsg(session_id="s", cycle=0, committed_len=3, tokens=[8], parents=[-1])
    reply = await request(nc, subjects.verifier_verify(instance), VerifyBatchRequest(batch_id="c", trees=[good]),
                          VerifyBatchReply)
    assert len(reply.results) == 1 and reply.rejected == []
    # a malformed tree for a session the verifier first re-prefills from Redis is refused on
    # its own: the batch's other tree is verified, and nobody waits out a timeout
    for sid in ("m", "n"):
        await record_session(redis_url, sid, [5, 6, 7])
    mixed = VerifyBatchRequest(batch_id="e", trees=[
        DraftTreeMsg(session_id="m", cycle=0, committed_len=3, tokens=[99999], parents=[-1]),
        DraftTreeMsg(session_id="n", cycle=0, committed_len=3, tokens=[8], parents=[-1])])
    reply = await request(nc, subjects.verifier_verify(instance), mixed, VerifyBatchReply)
    assert [(r.session_id, r.reason) for r in reply.rejected] == [("m", "token_out_of_vocab")]
    assert [r.session_id for r in reply.results] == ["n"]
    await asyncio.sleep(0.1)
    text = log_path.read_text()
    assert "Traceback" not in text and "rejected a tree" in text
    await nc.close()


async def test_a_prompt_too_long_for_any_session_evicts_nobody(verifier, nats_url, redis_url):
    """With every slot held by idle sessions, a prompt longer than --max-len is refused as
    `prompt_too_long` (the gateway's 400), not `no_capacity` after evicting them all."""
    instance, _ = verifier
    nc = await nats.connect(nats_url)
    for sid in ("a", "b", "c", "d"):  # the fixture's --max-sessions 4
        await record_session(redis_url, sid, [5, 6, 7])
        opened = await request(nc, subjects.verifier_prefill(instance),
                               PrefillRequest(session_id=sid, tokens=[5, 6, 7]), PrefillReply)
        assert opened.error is None
    long = await request(nc, subjects.verifier_prefill(instance),
                         PrefillRequest(session_id="long", tokens=[5] * 600), PrefillReply)  # --max-len 512
    assert long.error == "prompt_too_long"
    reply = await nc.request(subjects.stats("verifier", instance), b"", timeout=10)
    counters = protocol.decode(reply.data, protocol.ServiceStats).counters
    assert (counters["evictions"], counters["sessions"]) == (0, 4)
    await nc.close()
