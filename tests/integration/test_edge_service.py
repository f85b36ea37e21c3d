"""A real edge agent and a real verifier over real NATS, with the test as the scheduler in
between: drafts and results cross the bus as compact messages (a tree sent ahead of its
result is used when its guess came true), and the output is exactly the target's own
greedy decoding."""

import asyncio
import signal

import nats
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge import protocol, subjects
from specedge.models import BUNDLED_TARGET, bundled
from specedge.protocol import (
    DraftAssign,
    DraftTreeMsg,
    PrefillReply,
    PrefillRequest,
    VerifyBatchReply,
    VerifyBatchRequest,
)
from tests.helpers import record_session, registered, start_cli, wait_for

NEW_TOKENS = 40


async def test_edge_drafts_verifier_verifies_output_is_exact(nats_url, redis_url, cli_env, tmp_path):
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    text = tok.apply_chat_template([{"role": "user", "content": "Read a CSV file into a list of rows."}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    target = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    with torch.no_grad():
        reference = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
    reference = reference[0, len(prompt):].tolist()

    procs = {
        "verifier": start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "512"],
                              cli_env, tmp_path / "verifier.log"),
        "edge-agent": start_cli(["edge-agent", "--nats-url", nats_url, "--max-len", "512"], cli_env,
                                tmp_path / "edge.log"),
    }
    ids = {}
    for role, proc in procs.items():
        found = await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(nats_url, r, p.pid), 60, role)
        ids[role] = found[0].instance_id
    nc = await nats.connect(nats_url)
    drafts = await nc.subscribe(subjects.drafts(ids["edge-agent"], "test-scheduler"))
    await nc.flush()
    await record_session(redis_url, "s", prompt)
    opened = await nc.request(subjects.verifier_prefill(ids["verifier"]),
                              protocol.encode(PrefillRequest(session_id="s", tokens=prompt)), timeout=30)
    assert protocol.decode(opened.data, PrefillReply).error is None
    await nc.publish(subjects.edge_assign(ids["edge-agent"]),
                     protocol.encode(DraftAssign(session_id="s", tokens=prompt, scheduler="test-scheduler", budget=16,
                                                 depth=3, branch=4, beams=8)))
    output, cycles, nodes, last = [], 0, 0, []
    while len(output) < NEW_TOKENS:
        tree = protocol.decode((await drafts.next_msg(timeout=30)).data, DraftTreeMsg)
        if tree.assumed and (tree.cycle, tree.assumed) != (cycles, last):
            continue  # sent ahead on a guess that did not come true: the edge drafts this cycle again
        assert (tree.cycle, tree.committed_len) == (cycles, len(prompt) + len(output))
        nodes += len(tree.tokens)
        reply = protocol.decode((await nc.request(
            subjects.verifier_verify(ids["verifier"]),
            protocol.encode(VerifyBatchRequest(batch_id=str(cycles), trees=[tree])), timeout=30)).data,
            VerifyBatchReply)
        result = reply.results[0]
        await nc.publish(subjects.edge_result(ids["edge-agent"]), protocol.encode(result))
        last = [*result.accepted, result.bonus]
        output += last
        cycles += 1
    assert output[:NEW_TOKENS] == reference
    assert cycles < NEW_TOKENS and nodes > 0  # it really speculated
    await nc.close()
    for role, proc in procs.items():
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, role
        assert "Traceback" not in (tmp_path / ("verifier.log" if role == "verifier" else "edge.log")).read_text()
