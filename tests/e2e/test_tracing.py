"""Tracing end to end: the four services export OTLP/HTTP to a receiver this test runs;
one streaming request with the official `openai` client is one trace across all of them,
with a span per draft–verify cycle and, under each, the edge's drafting, the scheduler's
queueing, the verification batch (and the verifier's pass under it) and the delivery."""

import collections
import signal

import httpx
import openai
import pytest

from specedge.launcher import free_port
from tests.helpers import start_cli, wait_until_serving
from tests.otlp import Receiver, render

pytestmark = pytest.mark.e2e
MODEL = "specedge-tiny-target"
SERVICES = {"specedge-gateway", "specedge-scheduler", "specedge-verifier", "specedge-edge-agent"}


def test_one_streaming_request_is_one_trace_with_a_span_per_cycle(nats_url, redis_url, cli_env, tmp_path):
    with Receiver() as receiver:
        # A batch delay longer than the test: every span arrives through the flush on SIGTERM.
        env = {**cli_env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
        port = free_port()
        procs = {
            "verifier": start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "1024"],
                                  env, tmp_path / "verifier.log"),
            "scheduler": start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url, "--budget", "16",
                                    "--depth", "3"], env, tmp_path / "scheduler.log"),
            "edge-agent": start_cli(["edge-agent", "--nats-url", nats_url, "--max-len", "1024"], env,
                                    tmp_path / "edge.log"),
            "gateway": start_cli(["gateway", "--nats-url", nats_url, "--redis-url", redis_url, "--no-api-key",
                                  "--max-context", "1024", "--port", str(port)], env, tmp_path / "gateway.log"),
        }
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_serving(nats_url, procs, base)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Write a function that reverses a string."}],
                temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}))
            httpx.get(f"{base}/metrics")  # excluded from tracing, as /health is
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)  # each service flushes its spans on the way out
            for proc in procs.values():
                proc.wait(timeout=30)
        for log in tmp_path.glob("*.log"):
            assert "Traceback" not in log.read_text(), log.read_text()
        spans = receiver.snapshot()

    usage = chunks[-1].usage
    finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    assert {s.service for s in spans} == SERVICES

    # The request: the FastAPI server span, and under it `chat {model}` with the GenAI attributes.
    (chat,) = [s for s in spans if s.name == f"chat {MODEL}"]
    tid = chat.trace_id
    a = chat.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.request.max_tokens"] == 24 and a["gen_ai.request.temperature"] == 0
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == [finish]
    print(render(spans, tid))  # shown with -s; docs/observability.md has one
    (http,) = [s for s in spans if s.service == "specedge-gateway" and s.span_id == chat.parent_id]
    assert http.parent_id == "" and "/v1/chat/completions" in http.name
    assert not [s for s in spans if "/health" in s.name or "/metrics" in s.name]

    # One trace across the four services: every span of the request's session is in it.
    trace = [s for s in spans if s.trace_id == tid]
    assert {s.service for s in trace} == SERVICES
    by_id = {s.span_id: s for s in trace}
    children = collections.defaultdict(list)
    for s in trace:
        children[s.parent_id].append(s)
    assert all(s.parent_id in by_id for s in trace if s is not http)  # one tree, nothing dangling

    # One cycle span per verification, children of the request span, with drafting,
    # queueing, the verification (the verifier's pass under it) and the delivery.
    cycles = sorted((s for s in trace if s.name == "cycle"), key=lambda s: s.attributes["specedge.cycle"])
    verifier_passes = [s for s in trace if s.service == "specedge-verifier" and s.name == "verify batch"]
    assert len(cycles) == len(verifier_passes) > 1
    assert [c.attributes["specedge.cycle"] for c in cycles] == list(range(len(cycles)))
    assert all(c.parent_id == chat.span_id and c.service == "specedge-scheduler" for c in cycles)
    committed = 0
    for cycle in cycles:
        kids = {(k.service, k.name): k for k in children[cycle.span_id]}
        assert set(kids) == {("specedge-edge-agent", "draft"), ("specedge-scheduler", "queue"),
                             ("specedge-scheduler", "verify batch"), ("specedge-scheduler", "deliver")}, kids
        draft = kids["specedge-edge-agent", "draft"].attributes
        assert draft["specedge.tree.nodes"] > 0 and draft["specedge.tree.depth"] >= 1
        assert isinstance(draft["specedge.proactive_hit"], bool)
        assert draft["specedge.cycle"] == cycle.attributes["specedge.cycle"]
        queue = kids["specedge-scheduler", "queue"].attributes
        assert queue["specedge.batch.size"] == 1 and queue["specedge.queue.wait_ms"] >= 0
        batch = kids["specedge-scheduler", "verify batch"]
        assert batch.attributes["specedge.batch.id"] == queue["specedge.batch.id"]
        (served,) = children[batch.span_id]
        assert served.service == "specedge-verifier" and served.name == "verify batch"
        forward = next(k for k in children[served.span_id] if k.name == "forward pass").attributes
        assert forward["specedge.batch.size"] == 1 and forward["specedge.batch.nodes"] == draft[
            "specedge.tree.nodes"] + 1
        assert forward["specedge.accepted_len"] == cycle.attributes["specedge.accepted_len"]
        committed += cycle.attributes["specedge.tokens"]
        # spans in order: drafting, then queueing, then verifying, then delivering
        assert kids["specedge-scheduler", "queue"].end_ns <= batch.start_ns + 1_000_000
    assert committed == usage.completion_tokens
    assert cycles[-1].attributes["specedge.finish_reason"] == finish

    # The session's opening: the scheduler's span, the verifier's prefill under it.
    (opening,) = [s for s in trace if s.name == "open session"]
    assert opening.parent_id == chat.span_id
    assert any(k.name == "prefill" and k.service == "specedge-verifier" for k in children[opening.span_id])
