"""A real verifier process over real NATS: prefill and verify requests from a stand-in
scheduler/edge give exactly the target's output; bad input is refused, never fatal."""

import asyncio
import signal

import nats
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge import protocol, subjects
from specedge.engine.parties import Drafter
from specedge.engine.tree import TreeParams
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled
from specedge.protocol import (
    DraftTreeMsg,
    PrefillReply,
    PrefillRequest,
    VerifyBatchReply,
    VerifyBatchRequest,
)
from tests.helpers import registered, start_cli, wait_for


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


async def test_speculative_decoding_over_nats_matches_transformers(verifier, nats_url):
    instance, log_path = verifier
    target = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    text = tok.apply_chat_template([{"role": "user", "content": "Parse a date string."}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        reference = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)[0, len(prompt):]
    drafter = Drafter(AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_DRAFT)).eval(),
                      TreeParams(budget=16, depth=3, branch=4, beams=8))
    drafter.open("s1", prompt)
    nc = await nats.connect(nats_url)
    opened = await request(nc, subjects.verifier_prefill(instance), PrefillRequest(session_id="s1", tokens=prompt),
                           PrefillReply)
    assert (opened.error, opened.committed_len) == (None, len(prompt))
    output = []
    while len(output) < 32:
        tree = drafter.draft("s1")
        reply = await request(nc, subjects.verifier_verify(instance),
                              VerifyBatchRequest(batch_id=f"b{tree.cycle}", trees=[tree]), VerifyBatchReply)
        assert reply.rejected == [] and len(reply.results) == 1
        drafter.on_result(reply.results[0])
        output += [*reply.results[0].accepted, reply.results[0].bonus]
    assert output[:32] == reference.tolist()[:32]
    await nc.close()


async def test_bad_messages_are_refused_with_reasons_and_the_service_lives_on(verifier, nats_url):
    instance, log_path = verifier
    nc = await nats.connect(nats_url)
    garbage = await nc.request(subjects.verifier_verify(instance), b"\xc1garbage", timeout=10)
    assert protocol.decode(garbage.data, VerifyBatchReply).rejected[0].reason == "malformed"
    bad_prompt = await request(nc, subjects.verifier_prefill(instance),
                               PrefillRequest(session_id="x", tokens=[10**9]), PrefillReply)
    assert bad_prompt.error == "bad_prompt"
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
    await asyncio.sleep(0.1)
    text = log_path.read_text()
    assert "Traceback" not in text and "rejected a tree" in text
    await nc.close()
