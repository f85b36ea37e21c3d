"""The scheduler's spans, driven through `SchedulerService` (and its core) with a fake bus and an in-memory
exporter: a batch merging several sessions' trees is one span linked to each session's
cycle; a session taken over from a dead scheduler goes on under a root `session` span of
its own; sessions without span state are served without tracing and without failing."""

from __future__ import annotations

import asyncio
import types

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from specedge import protocol, telemetry
from specedge.protocol import (
    CloseSession,
    DraftTreeMsg,
    SamplingSpec,
    TokenEvent,
    VerifyBatchReply,
    VerifyBatchRequest,
    VerifyResult,
)
from specedge_scheduler import events
from specedge_scheduler import tracing as scheduler_tracing
from specedge_scheduler.core import SessionOutput
from specedge_scheduler.policy import SchedulingPolicy
from specedge_scheduler.service import SchedulerService
from specedge_scheduler.tracing import SessionSpans

EOS = 99


@pytest.fixture
def exported(monkeypatch):
    """Tracing on for the test (a provider of its own, not the global one): the ended spans."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(telemetry, "_provider", provider)
    monkeypatch.setattr(telemetry, "tracer", tracer)
    monkeypatch.setattr(scheduler_tracing, "tracer", tracer)
    yield exporter
    provider.shutdown()


class FakeBus:
    """What the scheduler sends (subject, decoded headers, payload); requests answered by `answer`."""

    def __init__(self, answer=None) -> None:
        self.sent: list[tuple[str, dict | None, bytes]] = []
        self.answer = answer

    async def publish(self, subject, payload=b"", reply="", headers=None):
        self.sent.append((subject, headers, payload))

    async def request(self, subject, payload, timeout, headers=None):  # noqa: ASYNC109 - the client's own
        self.sent.append((subject, headers, payload))
        return types.SimpleNamespace(data=self.answer(payload))

    def parent_of(self, suffix: str) -> list[str]:
        """The span ids the `traceparent` headers of messages to subjects ending in `suffix` name."""
        return [h["traceparent"].split("-")[2] for s, h, _ in self.sent if s.endswith(suffix) and h]


class FakeStore:
    async def end(self, session_id):
        pass

    async def assign(self, session_id, verifier, edge):
        pass


def service(nc: FakeBus) -> SchedulerService:
    policy = SchedulingPolicy(max_batch=4, strategy="fifo")
    policy.verifier_seen("v1", capacity=4, now=0)
    return SchedulerService(nc, "sched-1", FakeStore(), policy, draft_shape={"budget": 8, "depth": 3})


def open_session(svc: SchedulerService, sid: str, parent) -> SessionSpans:
    """A session as `_open` leaves it: assigned, prefilled, cycle 0 begun (no edge: server steps)."""
    svc.policy.assign(sid, 3, mode="autoregressive")
    svc.policy.draft_due(sid, 0.0)
    spans = svc.spans[sid] = SessionSpans(sid, parent)
    svc.core.outputs[sid] = SessionOutput(8, frozenset({EOS}))
    spans.begin_cycle(0)
    return spans


async def close(svc: SchedulerService, sid: str) -> None:
    await svc.feed(events.CloseRequested(protocol.encode(CloseSession(session_id=sid))))


def answer_all(payload: bytes) -> bytes:
    """The verifier: accept the first drafted token of every tree, bonus 7."""
    request = protocol.decode(payload, VerifyBatchRequest)
    return protocol.encode(VerifyBatchReply(batch_id=request.batch_id, forward_ms=1.0, results=[
        VerifyResult(session_id=t.session_id, cycle=t.cycle, committed_len=t.committed_len, accepted=t.tokens[:1],
                     bonus=7) for t in request.trees]))


def tree(sid: str) -> DraftTreeMsg:
    return DraftTreeMsg(session_id=sid, cycle=0, committed_len=3, tokens=[5, 6], parents=[-1, 0])


def sid_of(span) -> str:
    return span.attributes["specedge.session.id"]


def test_a_batch_of_several_sessions_is_one_span_linked_to_each_cycle(exported):
    nc = FakeBus(answer_all)
    svc = service(nc)
    tracer = scheduler_tracing.tracer
    requests = {sid: tracer.start_span(f"chat {sid}") for sid in ("a", "b")}  # the gateways' spans
    for sid, span in requests.items():
        open_session(svc, sid, trace.set_span_in_context(span))

    asyncio.run(svc._verify(events.Verify("v1", (tree("a"), tree("b")))))

    spans = exported.get_finished_spans()
    (batch,) = [s for s in spans if s.name == "verify batch"]
    cycles = {sid_of(s): s for s in spans if s.name == "cycle"}
    assert set(cycles) == {"a", "b"}
    # the batch: a trace of its own, linked to the cycle of every session it serves
    assert batch.parent is None and batch.kind == trace.SpanKind.CLIENT
    assert batch.context.trace_id not in {c.context.trace_id for c in cycles.values()}
    assert {(link.context.trace_id, link.context.span_id) for link in batch.links} == {
        (c.context.trace_id, c.context.span_id) for c in cycles.values()}
    assert batch.attributes["specedge.batch.size"] == 2
    # each cycle: in its request's trace, with its queueing (linked back to the batch) and delivery
    for sid, cycle in cycles.items():
        assert cycle.parent.span_id == requests[sid].get_span_context().span_id
        assert cycle.context.trace_id == requests[sid].get_span_context().trace_id
        assert cycle.attributes["specedge.tokens"] == 2 and cycle.attributes["specedge.accepted_len"] == 1
        kids = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == cycle.context.span_id}
        assert set(kids) == {"queue", "deliver"}
        assert [link.context.span_id for link in kids["queue"].links] == [batch.context.span_id]
        assert kids["queue"].attributes["specedge.batch.id"] == batch.attributes["specedge.batch.id"]
    # the tokens went out under each delivery, the request to the verifier under the batch
    delivered = {f"{s.context.span_id:016x}" for s in spans if s.name == "deliver"}
    assert set(nc.parent_of(".tokens")) == delivered
    assert nc.parent_of(".verify") == [f"{batch.context.span_id:016x}"]  # the verifier's spans go under it
    for sid in ("a", "b"):  # the next cycle has begun
        spans_of = svc.spans[sid]
        assert spans_of.cycle == 1 and spans_of.cycle_span is not None

    # A batch of one session is simply a child of that session's cycle.
    exported.clear()
    asyncio.run(svc._verify(events.Verify("v1", (DraftTreeMsg(session_id="a", cycle=1, committed_len=5, tokens=[5],
                                                            parents=[-1]),))))
    spans = exported.get_finished_spans()
    (batch,) = [s for s in spans if s.name == "verify batch"]
    (cycle,) = [s for s in spans if s.name == "cycle"]
    assert batch.parent.span_id == cycle.context.span_id and not batch.links
    for span in requests.values():
        span.end()


def test_an_adopted_session_goes_on_under_a_session_span_of_its_own(exported):
    nc = FakeBus()
    svc = service(nc)
    record = types.SimpleNamespace(session_id="s", max_new_tokens=8, eos_ids=[EOS], tokens=[1, 2, 3, 4, 5],
                                   mode="autoregressive", user="", verifier="v1", cycle=2, scheduler="dead-1",
                                   edge="", output=[4, 5], sampling=SamplingSpec(), idle_s=10.0)
    asyncio.run(svc.feed(events.OrphanClaimed(record, "dead-1")))

    spans = svc.spans["s"]
    assert spans.own is not None and spans.cycle == 2 and spans.cycle_span is not None
    root = spans.own.get_span_context()
    # the committed output re-sent from index 0, in the new trace
    (subject, headers, payload) = next(m for m in nc.sent if m[0].endswith(".tokens"))
    assert protocol.decode(payload, TokenEvent).tokens == [4, 5]
    assert trace.get_current_span(propagate.extract(headers)).get_span_context().trace_id == root.trace_id
    asyncio.run(close(svc, "s"))
    ended = exported.get_finished_spans()
    (session,) = [s for s in ended if s.name == "session"]
    assert session.parent is None and session.attributes["specedge.adopted_from"] == "dead-1"
    (cycle,) = [s for s in ended if s.name == "cycle"]
    assert cycle.parent.span_id == session.context.span_id and cycle.attributes["specedge.cycle"] == 2


def test_sessions_without_span_state_are_served_and_not_traced(exported):
    nc = FakeBus(answer_all)
    svc = service(nc)
    provider, telemetry._provider = telemetry._provider, None  # opened while tracing was off: no spans
    try:
        open_session(svc, "a", None)
        open_session(svc, "b", None)
    finally:
        telemetry._provider = provider  # on again
    asyncio.run(svc._verify(events.Verify("v1", (tree("a"), tree("b")))))
    asyncio.run(close(svc, "a"))
    asyncio.run(close(svc, "b"))
    sent = [protocol.decode(p, TokenEvent) for s, _, p in nc.sent if s.endswith(".tokens")]
    assert sorted(e.session_id for e in sent) == ["a", "b"] and all(e.tokens == [5, 7] for e in sent)
    assert not exported.get_finished_spans()
