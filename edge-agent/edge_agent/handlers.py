"""The edge agent's face on the bus: draft for assigned sessions, proactively.

Owns, per session: prefill on assignment, publishing each draft tree on the edge's own
drafts subject, and — while a tree is out for verification — proactive drafting one
draft pass at a time off the event loop, so a result is picked up within one pass; a
proactive tree finished before the result is sent ahead, naming the outcome it assumes,
and the next is drafted from its guessed result in turn (a chain of up to two).
On a result it applies it (reusing the proactive tree on a hit) and publishes the next
tree to the scheduler that owns the session — or, when the hit's tree already went out
ahead, starts drafting the one after. Malformed or stale messages are refused with
a reason and counted, never fatal. If the server side refuses this edge altogether (its
draft tokenizer differs from the target's), it says why and the agent stops.
While tracing is on, each tree sent is a `draft` span — from the assignment or result
arriving to the tree leaving — under the cycle span whose context that message carried.
The draft engine is `specedge.engine.parties.Drafter`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace

from specedge import bus, protocol, subjects, telemetry
from specedge.engine.parties import Drafter, StaleMessageError
from specedge.engine.runner import CacheFullError
from specedge.engine.tree import TreeParams
from specedge.protocol import (
    CloseSession,
    DraftAssign,
    DraftTreeMsg,
    EdgeRefused,
    ProtocolError,
    Reason,
    Rejections,
    ServiceStats,
    StatsRequest,
    VerifyResult,
    spans_since,
)

log = logging.getLogger("edge_agent")


class EdgeService:
    def __init__(self, nc: Client, instance_id: str, drafter: Drafter, stop: asyncio.Event | None = None,
                 proactive: bool = True, send_ahead: bool = True) -> None:
        """`proactive`: draft ahead while a tree is out (off for a server-side drafter, which
        has no network wait to hide); `send_ahead`: send a finished proactive tree before the
        result comes (the scheduler verifies it at once if the guess was right)."""
        self.nc, self.instance_id, self.drafter = nc, instance_id, drafter
        self.proactive = proactive
        self.send_ahead = proactive and send_ahead
        self.sent_ahead = self.ahead_used = 0  # trees sent ahead; those whose guess came true
        self.drafts_sent = 0
        self.spans: deque[list[float]] = deque(maxlen=5000)  # recent drafting, for timelines
        self._to_draft: set[str] = set()  # sessions waiting for their next tree
        self._drafting: asyncio.Task | None = None
        self._results = None  # the result subscription (its backlog tells the drafter to wait)
        self.stop = stop or asyncio.Event()  # set when the server side refuses this edge
        self.refused: EdgeRefused | None = None
        self._scheduler: dict[str, str] = {}  # session -> the scheduler collecting its drafts
        self.reject = Rejections(log)
        self._lock = asyncio.Lock()  # the draft model runs one pass at a time
        self._drafting_ahead: set[str] = set()  # sessions whose proactive drafting may continue
        self._tasks: set[asyncio.Task] = set()
        self._sent_at: dict[str, float] = {}
        # (round trip ms from a tree leaving to its result arriving, the verifier's forward ms)
        self.round_trips: deque[tuple[float, float]] = deque(maxlen=10_000)
        # session -> (its cycle's trace context, when the assignment/result arrived, proactive hit); tracing only
        self._cycle: dict[str, tuple[otel_context.Context, int, bool]] = {}
        # session -> cycle -> (its tree sent ahead, when drafting it began and when it left, ns); tracing only
        self._ahead_sent: dict[str, dict[int, tuple[DraftTreeMsg, int, int]]] = {}

    async def subscribe(self) -> None:
        nc = self.nc
        await bus.subscribe(nc, subjects.edge_assign(self.instance_id), cb=self.on_assign)
        self._results = await bus.subscribe(nc, subjects.edge_result(self.instance_id), cb=self.on_result)
        await bus.subscribe(nc, subjects.edge_close(self.instance_id), cb=self.on_close)
        await bus.subscribe(nc, subjects.edge_refused(self.instance_id), cb=self.on_refused)
        await bus.subscribe(nc, subjects.stats("edge-agent", self.instance_id), cb=self.on_stats)
        await self.nc.flush()

    async def on_stats(self, msg: Msg) -> None:
        request = StatsRequest() if not msg.data else self.reject.decode(msg.data, StatsRequest, "a stats request")
        if request is None:
            return
        s = self.drafter.stats
        counters = {"busy_s": s.busy_s, "forward_passes": s.forward_passes, "proactive_hits": s.proactive_hits,
                    "proactive_attempts": s.proactive_attempts, "drafts_sent": self.drafts_sent,
                    "sent_ahead": self.sent_ahead, "ahead_used": self.ahead_used,
                    "sessions": len(self.drafter.sessions)}
        if msg.reply:
            now = time.monotonic()
            await msg.respond(protocol.encode(ServiceStats(instance_id=self.instance_id, counters=counters,
                                                           spans=spans_since(self.spans, request.cutoff(now)),
                                                           now=now)))

    async def on_refused(self, msg: Msg) -> None:
        if (refused := self.reject.decode(msg.data, EdgeRefused, "a refusal")) is None:
            return
        log.error("the server side refuses this edge (%s): %s", refused.reason, refused.message)
        self.refused = refused
        self.stop.set()

    async def on_assign(self, msg: Msg) -> None:
        try:
            assign = protocol.decode(msg.data, DraftAssign, protocol.MAX_SESSION_MESSAGE_BYTES)
            params = TreeParams(assign.budget, assign.depth, assign.branch, assign.beams, assign.temperature)
            subjects.drafts(self.instance_id, assign.scheduler)  # a usable subject token
        except (ProtocolError, ValueError) as exc:
            self.reject(getattr(exc, "reason", "bad_params"), "an assignment")
            return
        self._cycle_began(assign.session_id, hit=False)
        async with self._lock:
            self.drafter.close(assign.session_id)
            try:
                await asyncio.to_thread(self.drafter.open, assign.session_id, assign.tokens, params, assign.cycle,
                                        assign.grammar, assign.end_ids, assign.prompt_len)
            except (CacheFullError, ValueError) as exc:
                self.drafter.close(assign.session_id)
                self.reject(Reason.CANNOT_OPEN, f"session {assign.session_id[:16]} ({exc})")
                return
        self._scheduler[assign.session_id] = assign.scheduler
        await self._send_next(assign.session_id)

    async def on_result(self, msg: Msg) -> None:
        if (result := self.reject.decode(msg.data, VerifyResult, "a result")) is None:
            return
        await self._apply(result)

    async def _apply(self, result: VerifyResult) -> None:
        if result.session_id not in self.drafter.sessions:
            self.reject(Reason.UNKNOWN_SESSION, "a result")
            return
        sent = self._sent_at.pop(result.session_id, None)
        if sent is not None:
            self.round_trips.append((1000 * (time.monotonic() - sent), result.verify_ms))
        self._stop_proactive(result.session_id)
        arrived = time.time_ns()
        async with self._lock:
            try:
                hit = await asyncio.to_thread(self.drafter.on_result, result)
            except (StaleMessageError, ValueError) as exc:
                self.reject(Reason.STALE_OR_BAD_RESULT, f"a result for {result.session_id[:16]} ({exc})")
                return
            self._cycle_began(result.session_id, hit, arrived)
            if result.next_budget > 0 and result.next_depth > 0:
                self.drafter.reshape(result.session_id, result.next_budget, result.next_depth)
            held = self._ahead_sent.get(result.session_id, {})
            sent = held.pop(result.cycle + 1, None)
            if not hit:
                held.clear()
            if hit and self.drafter.sessions[result.session_id].current_sent:
                # The tree for this cycle went out ahead and is verified already: go on drafting ahead.
                self.ahead_used += 1
                if sent is not None:  # its `draft` span, under the cycle it turned out to be for
                    self._draft_span(sent[0], began_ns=sent[1], ended_ns=sent[2])
                self.drafter.start_proactive(result.session_id)
                self._keep_drafting_ahead(result.session_id)
                return
        await self._send_next(result.session_id)

    async def on_close(self, msg: Msg) -> None:
        if (close := self.reject.decode(msg.data, CloseSession, "a close request")) is None:
            return
        self._stop_proactive(close.session_id)
        self._scheduler.pop(close.session_id, None)
        self._sent_at.pop(close.session_id, None)
        self._cycle.pop(close.session_id, None)
        self._ahead_sent.pop(close.session_id, None)
        async with self._lock:
            self.drafter.close(close.session_id)

    async def _send_next(self, session_id: str) -> None:
        """Queue the session for its next tree; one task drafts every waiting session together."""
        self._to_draft.add(session_id)
        if self._drafting is None or self._drafting.done():
            self._drafting = asyncio.create_task(self._draft_waiting())

    async def _draft_waiting(self) -> None:
        """Draft the next tree of every waiting session in one batched pass per level (results
        of one verification batch arrive together), then publish each and draft ahead."""
        while self._to_draft:
            for _ in range(10):  # results still queued on the subscription join this batch
                if self._results is None or self._results.pending_msgs == 0:
                    break
                await asyncio.sleep(0.0005)
            waiting = sorted(self._to_draft)
            self._to_draft.clear()
            async with self._lock:
                waiting = [s for s in waiting if s in self.drafter.sessions and s in self._scheduler]
                if not waiting:
                    continue
                started, at = time.perf_counter(), time.monotonic()
                trees = await asyncio.to_thread(self.drafter.draft_many, waiting)
                self.spans.append([at, time.monotonic()])
                draft_ms = 1000 * (time.perf_counter() - started)
                if self.proactive:
                    for session_id in waiting:
                        self.drafter.start_proactive(session_id)
            for tree in trees:
                await self._publish(msgspec.structs.replace(tree, draft_ms=draft_ms))

    async def _publish(self, tree: DraftTreeMsg) -> None:
        session_id = tree.session_id
        scheduler = self._scheduler.get(session_id)
        if scheduler is None:  # closed while its tree was being drafted: nobody wants it
            return
        self._sent_at[session_id] = time.monotonic()
        await bus.publish(self.nc, subjects.drafts(self.instance_id, scheduler), protocol.encode(tree),
                          context=self._draft_span(tree))
        self.drafts_sent += 1
        if self.proactive:
            self._keep_drafting_ahead(session_id)

    def _cycle_began(self, session_id: str, hit: bool, arrived_ns: int | None = None) -> None:
        """Remember the cycle this session now drafts for: the context its message carried."""
        if telemetry.enabled():
            self._cycle[session_id] = (otel_context.get_current(), arrived_ns or time.time_ns(), hit)

    def _draft_span(self, tree: DraftTreeMsg, began_ns: int | None = None,
                    ended_ns: int | None = None) -> otel_context.Context | None:
        """The `draft` span of a tree about to leave (from its cycle's start to now); its context.
        A tree sent ahead gets its span once its guess proved right, under that cycle, from
        `began_ns` to `ended_ns` (when it was drafted and sent)."""
        cycle = self._cycle.pop(tree.session_id, None)
        if cycle is None:
            return None
        parent, cycle_began_ns, hit = cycle
        span = telemetry.tracer.start_span("draft", context=parent, start_time=began_ns or cycle_began_ns,
                                           attributes={
            "specedge.session.id": tree.session_id, "specedge.cycle": tree.cycle,
            "specedge.tree.nodes": len(tree.tokens), "specedge.tree.depth": telemetry.tree_depth(tree.parents),
            "specedge.proactive_hit": hit, "specedge.draft_ms": tree.draft_ms,
            "specedge.sent_ahead": bool(tree.assumed)})
        span.end(end_time=ended_ns)
        return trace.set_span_in_context(span)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _keep_drafting_ahead(self, session_id: str) -> None:
        """Proactive drafting for this session, pass by pass, until its result comes."""
        self._drafting_ahead.add(session_id)
        self._spawn(self._draft_ahead(session_id))

    async def _draft_ahead(self, session_id: str) -> None:
        """Proactive drafting, one pass at a time, until done or told to stop: each tree
        finished before its result came is sent ahead, and the next one is drafted from its
        guessed result (up to the drafter's `max_ahead`).

        Stopping is a flag checked between passes, never a cancellation: a pass already
        running in its thread finishes before anything else touches the draft model.
        """
        began_ns, drafting_s = time.time_ns(), 0.0
        while session_id in self._drafting_ahead:
            ahead = None
            async with self._lock:
                if session_id not in self._drafting_ahead or session_id not in self.drafter.sessions:
                    return
                at = time.monotonic()
                more = await asyncio.to_thread(self.drafter.proactive_step, session_id)
                self.spans.append([at, time.monotonic()])
                drafting_s += self.spans[-1][1] - at
                if not more and self.send_ahead and session_id in self._drafting_ahead:
                    ahead = self.drafter.tree_ahead(session_id)  # finished before the result came
                    if ahead is not None:
                        ahead = msgspec.structs.replace(ahead, draft_ms=1000 * drafting_s)
            if not more:
                if ahead is None or (scheduler := self._scheduler.get(session_id)) is None:
                    return
                self.sent_ahead += 1
                if telemetry.enabled():
                    self._ahead_sent.setdefault(session_id, {})[ahead.cycle] = (ahead, began_ns, time.time_ns())
                await bus.publish(self.nc, subjects.drafts(self.instance_id, scheduler), protocol.encode(ahead))
                async with self._lock:  # and the tree after it, from its guessed result
                    if session_id not in self._drafting_ahead or session_id not in self.drafter.sessions \
                            or not self.drafter.start_proactive(session_id):
                        return
                began_ns, drafting_s = time.time_ns(), 0.0
            await asyncio.sleep(0)  # let a waiting result take the lock

    def _stop_proactive(self, session_id: str) -> None:
        self._drafting_ahead.discard(session_id)
