"""The scheduler's spans: one span per draft–verify cycle of each session, and under it
the queueing, the verification batch and the delivery.

The scheduler owns the cycle spans because it is the one party that sees every cycle
begin (it sends the drafter the assignment, or the previous cycle's result) and end (it
delivers the result). Cycle N's context leaves in the headers of the `DraftAssign` or
`VerifyResult` that starts it, so the edge's drafting span is its child, and in the
headers of the verification request, so the verifier's pass is too. Cycles are children
of the session's parent: the gateway's request span (from the `SessionOpen` headers),
or, when the opener sent no trace context, a `session` span of the scheduler's own.

A batch that merges several sessions' trees is one span, a new trace linked to each
cycle it serves, and each session's queueing span links back to it; a batch of one
session is simply a child of that session's cycle.

A session taken over from a scheduler that died (`core.SchedulerCore._orphan`) goes on
under a new root `session` span (`specedge.adopted_from`: the dead scheduler), its cycles
numbered on from the Redis record's; the dead scheduler's open spans are simply never
ended (never exported).

Every method is a no-op while tracing is off (`specedge.telemetry.enabled()`), and
none fails for a session whose spans are missing or already closed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from specedge import telemetry
from specedge.protocol import DraftTreeMsg
from specedge.telemetry import tracer


class SessionSpans:
    """The spans of one session as its scheduler sees them."""

    def __init__(self, session_id: str, parent: Context | None, adopted_from: str | None = None) -> None:
        """`parent`: the opener's context (None or without a span: a root `session` span of
        our own); `adopted_from`: the scheduler whose session this was (taken over; the
        opener's trace is not in the Redis record, so the session goes on in a new trace)."""
        self.session_id = session_id
        self.own: Span | None = None  # a root `session` span, when the opener sent no trace context
        self.parent = parent
        self.cycle_span: Span | None = None
        self.cycle = -1
        self.began_ns = 0  # when the current cycle began
        self.arrived: tuple[int, int] | None = None  # (cycle, when its draft arrived)
        self._delivery: tuple[Span, Span, int, int, str | None] | None = None  # (deliver, its cycle, …)
        self.on = telemetry.enabled()  # a session opened untraced stays so
        if self.on and (adopted_from is not None
                        or not trace.get_current_span(parent).get_span_context().is_valid):
            attributes = {"specedge.session.id": session_id}
            if adopted_from is not None:
                attributes["specedge.adopted_from"] = adopted_from
            self.own = tracer.start_span("session", context=Context(), attributes=attributes)
            self.parent = trace.set_span_in_context(self.own)

    @property
    def session_context(self) -> Context | None:
        """The session's own context (the opener's span, or our `session` span); None when not traced."""
        return self.parent if self.on else None

    @property
    def context(self) -> Context | None:
        """The current cycle's context (for the messages of this cycle); None when not traced."""
        return None if self.cycle_span is None else trace.set_span_in_context(self.cycle_span)

    def begin_cycle(self, cycle: int) -> None:
        if not self.on:
            return
        self.cycle, self.began_ns = cycle, time.time_ns()
        self.cycle_span = tracer.start_span("cycle", context=self.parent, start_time=self.began_ns, attributes={
            "specedge.session.id": self.session_id, "specedge.cycle": cycle})

    def draft_arrived(self, cycle: int) -> None:
        if self.cycle_span is not None:
            self.arrived = (cycle, time.time_ns())

    def queued(self, tree: DraftTreeMsg, batch_id: str, batch_size: int, batch: Span | None, now_ns: int) -> None:
        """The `queue` span: from the draft's arrival (a server step: the cycle's start) to dispatch."""
        if self.cycle_span is None:
            return
        since = self.arrived[1] if self.arrived and self.arrived[0] == tree.cycle else self.began_ns
        links = [Link(batch.get_span_context())] if batch is not None else None
        span = tracer.start_span("queue", context=self.context, start_time=since, links=links, attributes={
            "specedge.batch.id": batch_id, "specedge.batch.size": batch_size,
            "specedge.queue.wait_ms": (now_ns - since) / 1e6, "specedge.tree.nodes": len(tree.tokens),
            "specedge.server_step": not tree.tokens})
        span.end(end_time=now_ns)

    def start_delivery(self, accepted: int, committed: int, finish_reason: str | None) -> None:
        """The `deliver` span around publishing a result begins; the cycle ends with it
        (`end_delivery`). Meanwhile `begin_cycle` may start the next cycle (whose context
        goes to the edge)."""
        if self.cycle_span is None:
            self._delivery = None
            return
        span = tracer.start_span("deliver", context=self.context, attributes={"specedge.tokens": committed})
        self._delivery = (span, self.cycle_span, accepted, committed, finish_reason)

    @property
    def delivery_context(self) -> Context | None:
        """The context of the delivery under way (for the committed tokens); None when not traced."""
        return trace.set_span_in_context(self._delivery[0]) if self._delivery is not None else None

    def end_delivery(self) -> None:
        if self._delivery is None:
            return
        span, cycle, accepted, committed, finish_reason = self._delivery
        self._delivery = None
        span.end()
        cycle.set_attributes({"specedge.accepted_len": accepted, "specedge.tokens": committed})
        if finish_reason is not None:
            cycle.set_attribute("specedge.finish_reason", finish_reason)
        cycle.end()
        if self.cycle_span is cycle:
            self.cycle_span = None

    def close(self, error: str | None = None) -> None:
        """The session ended: end what is open (with `error` as its status, if any)."""
        for span in (self.cycle_span, self.own):
            if span is None:
                continue
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()
        self.cycle_span = self.own = None


def batch_span(batch_id: str, verifier: str, trees: Sequence[DraftTreeMsg],
               sessions: Sequence[SessionSpans | None]) -> Span | None:
    """The span of one verification request, and each session's `queue` span up to now."""
    traced = [s for s in sessions if s is not None and s.cycle_span is not None]
    if not traced:
        return None
    one = len(trees) == 1
    span = tracer.start_span(
        "verify batch", context=traced[0].context if one else Context(), kind=SpanKind.CLIENT,
        links=None if one else [Link(s.cycle_span.get_span_context()) for s in traced],
        attributes={"specedge.batch.id": batch_id, "specedge.batch.size": len(trees),
                    "specedge.batch.nodes": sum(len(t.tokens) + 1 for t in trees), "specedge.verifier": verifier})
    now = time.time_ns()
    for tree, session in zip(trees, sessions, strict=True):
        if session is not None:
            session.queued(tree, batch_id, len(trees), None if one else span, now)
    return span
