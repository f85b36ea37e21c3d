"""What tracing costs per draft–verify cycle, measured without the noise of a whole system.

Replays, in one process, the tracing work every service does for one cycle of one
session — the scheduler's `cycle`, `queue`, `verify batch` and `deliver` spans and the
trace headers of the four messages it sends; the edge's `draft` span; the verifier's
`verify batch` and `forward pass` spans; extracting the context from each message
received — with the real SDK (batch span processor, OTLP/HTTP exporter to a sink in
another process that discards), and the same calls with tracing off. Reports CPU
microseconds per cycle on the services' own threads, by service, and on the batch
processor's export thread (everything exported: the queue is made large enough).

    python -m specedge_bench.scheduler_tracing [--cycles 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from specedge import bus, telemetry
from specedge.protocol import DraftTreeMsg, VerifyResult
from specedge_scheduler.tracing import SessionSpans, batch_span

TREE = DraftTreeMsg(session_id="s" * 32, cycle=0, committed_len=100, tokens=list(range(32)),
                    parents=[-1, *range(31)])


def _received(headers: dict[str, str] | None) -> object:
    """What `bus.subscribe` does for a message: the context of its headers, attached."""
    if not headers:
        return None
    return otel_context.attach(propagate.extract(headers))


def _done(token: object) -> None:
    if token is not None:
        otel_context.detach(token)


def scheduler_cycle(spans: SessionSpans, cycle: int) -> list[dict[str, str] | None]:
    """The scheduler's part of one cycle; returns the headers of what it sent the others."""
    sent = [bus.trace_headers(spans.context)]  # DraftAssign / VerifyResult to the edge
    _done(_received(sent[0]))  # (the draft coming back carries the edge's context)
    spans.draft_arrived(cycle)
    tree = DraftTreeMsg(session_id=TREE.session_id, cycle=cycle, committed_len=100, tokens=TREE.tokens,
                        parents=TREE.parents)
    span = batch_span(f"b{cycle}", "verifier", [tree], [spans])
    sent.append(bus.trace_headers(telemetry.context_of(span)))  # the verification request
    if span is not None:
        span.set_attributes({"specedge.verify.forward_ms": 20.0, "specedge.verify.accepted_tokens": 3,
                             "specedge.verify.rejected": 0})
        span.end()
    result = VerifyResult(session_id=TREE.session_id, cycle=cycle, committed_len=100, accepted=[1, 2, 3], bonus=4)
    with spans.delivering(result, 4, None) as delivery:
        sent.append(bus.trace_headers(delivery))  # the TokenEvent to the gateway
        spans.begin_cycle(cycle + 1)
    return sent


def edge_cycle(headers: dict[str, str] | None, cycle: int) -> None:
    token = _received(headers)
    try:
        if telemetry.enabled():
            parent, began = otel_context.get_current(), time.time_ns()
            span = telemetry.tracer.start_span("draft", context=parent, start_time=began, attributes={
                "specedge.session.id": TREE.session_id, "specedge.cycle": cycle,
                "specedge.tree.nodes": len(TREE.tokens), "specedge.tree.depth": telemetry.tree_depth(TREE.parents),
                "specedge.proactive_hit": True, "specedge.draft_ms": 10.0})
            span.end()
            bus.trace_headers(telemetry.context_of(span))
    finally:
        _done(token)


def verifier_cycle(headers: dict[str, str] | None) -> None:
    token = _received(headers)
    try:
        with telemetry.span("verify batch", attributes={"specedge.batch.id": "b", "specedge.batch.size": 1}) as outer:
            with telemetry.span("forward pass", attributes={"specedge.batch.size": 1,
                                                            "specedge.batch.nodes": 33}) as inner:
                if inner is not None:
                    inner.set_attribute("specedge.accepted_len", 3)
            if outer is not None:
                outer.set_attributes({"specedge.verify.rejected": 0, "specedge.verify.results": 1})
    finally:
        _done(token)


def measure(cycles: int) -> dict[str, float]:
    """CPU µs per cycle, by service, with tracing as this process has it now."""
    spans = SessionSpans(TREE.session_id, None)
    spans.begin_cycle(0)
    cpu = {"scheduler": 0.0, "edge-agent": 0.0, "verifier": 0.0}
    for cycle in range(cycles):
        t0 = time.thread_time()
        sent = scheduler_cycle(spans, cycle)
        t1 = time.thread_time()
        edge_cycle(sent[0], cycle)
        t2 = time.thread_time()
        verifier_cycle(sent[1])
        t3 = time.thread_time()
        cpu["scheduler"] += t1 - t0
        cpu["edge-agent"] += t2 - t1
        cpu["verifier"] += t3 - t2
    spans.close()
    return {k: 1e6 * v / cycles for k, v in cpu.items()}


SINK = """
import http.server, sys
class Discard(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Discard)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description="Tracing's CPU cost per draft–verify cycle, on against off.")
    parser.add_argument("--cycles", type=int, default=20000)
    args = parser.parse_args()
    off = measure(args.cycles)
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.stdout.readline().strip()}"
        os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(20 * args.cycles)  # export every span: none dropped
        telemetry.setup("scheduler", "bench-tracing")
        measure(min(args.cycles, 2000))  # warm up
        trace.get_tracer_provider().force_flush(60_000)  # the warm-up exported before measuring
        process, thread = time.process_time(), time.thread_time()
        on = measure(args.cycles)
        telemetry.shutdown(60)  # the export thread: serializing and sending every span
        exporting = (time.process_time() - process) - (time.thread_time() - thread)
    finally:
        sink.terminate()
    exported_us = 1e6 * exporting / args.cycles
    lines = [f"{args.cycles} cycles; CPU µs per cycle", "",
             "| where | tracing off | tracing on | added |", "|---|---|---|---|"]
    for service in off:
        lines.append(f"| {service} | {off[service]:.1f} | {on[service]:.1f} | {on[service] - off[service]:.1f} |")
    lines.append(f"| export thread (all services' spans) | 0 | {exported_us:.1f} | {exported_us:.1f} |")
    added = sum(on.values()) - sum(off.values()) + exported_us
    lines.append(f"| total | {sum(off.values()):.1f} | {sum(on.values()) + exported_us:.1f} | {added:.1f} |")
    print("\n".join(lines))  # noqa: T201 - a benchmark's report


if __name__ == "__main__":
    main()
