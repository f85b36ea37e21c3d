"""The scheduler on the bus: opens sessions, collects drafts, dispatches verification batches.

Owns the wiring of `SchedulingPolicy` to NATS and Redis: registry traffic tells it which
verifiers and edges exist (and their capacity, owner and pool); `sessions.open` requests
(queue group `schedulers`: each goes to one scheduler, which then owns the session) are
recorded in Redis, assigned, prefilled on their verifier and handed to a drafter; drafts
arrive on `drafts.<edge>.<this scheduler>`, are checked and queued; whenever a verifier is
free, its next batch goes out in one request; each result goes back to the session's edge
and, as a `TokenEvent`, to whoever opened the session. Edges that stop heartbeating are
dropped and their sessions continue with server steps; a verifier that stops is replaced
by another, which re-prefills the session from its committed tokens in Redis — without
losing or repeating a token. A scheduler that stops heartbeating (crashed, or restarted
under a new id) has its sessions taken over by another one (`_take_over`): everything
needed is in the session's Redis record, and the taker first re-sends the committed output
from index 0, so a gateway that missed some of it fills the gap (it skips what it has).
While no heartbeat at all arrives — not even our own — the bus is down, and nobody is
expired for silence. Decisions live in the policy; spans in `tracing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode

from specedge import bus, protocol, registry, subjects, telemetry
from specedge.metrics import SchedulerMetrics
from specedge.protocol import (
    CloseSession,
    DraftAssign,
    DraftTreeMsg,
    EdgeRefused,
    PrefillReply,
    PrefillRequest,
    ProtocolError,
    Reason,
    Rejections,
    ServiceAnnouncement,
    ServiceLeave,
    ServiceStats,
    SessionOpen,
    SessionOpened,
    TokenEvent,
    VerifyBatchReply,
    VerifyBatchRequest,
    VerifyResult,
    cut_output,
)
from specedge.state import SessionStore
from specedge_scheduler.guard import EdgeGuard, Verdict
from specedge_scheduler.policy import Move, NoCapacityError, SchedulingPolicy
from specedge_scheduler.tracing import SessionSpans, batch_span

log = logging.getLogger("specedge_scheduler")


@dataclasses.dataclass
class _Output:
    max_new_tokens: int
    eos_ids: set[int]
    spans: SessionSpans
    generated: int = 0
    tree_temperature: float = 1.0  # its drafts' scoring temperature (from its sampling)


_WHY = {Reason.UNKNOWN_SESSION: "its state is gone from Redis (expired, or Redis restarted without persistence)",
        Reason.STALE_CYCLE: "its state in Redis is behind what was verified (Redis lost recent writes)"}


class SchedulerService:
    HOUSEKEEPING_S = 0.1
    ORPHAN_MAX_IDLE_S = 90.0  # an orphaned session without a commit for longer: nobody waits for it; deleted
    STATE_RETRY_S = 0.5  # wait between tries of a session whose Redis was unreachable
    ENDED_MEMORY_S = 60.0  # how long a late draft for an ended session is forgiven

    def __init__(self, nc: Client, instance_id: str, store: SessionStore, policy: SchedulingPolicy,
                 draft_shape: dict[str, int], request_timeout_s: float = 30.0,
                 metrics: SchedulerMetrics | None = None, heartbeat_s: float = 2.0,
                 guard: EdgeGuard | None = None) -> None:
        self.nc, self.instance_id, self.store = nc, instance_id, store
        self.guard = guard or EdgeGuard()
        self._draft_subs: dict[str, Subscription] = {}  # per edge: its drafts to us (none while it is cut off)
        self._ended: dict[str, float] = {}  # sessions ended lately: a draft already on its way is no offence
        self.policy, self.draft_shape = policy, draft_shape
        self.request_timeout_s, self.heartbeat_s = request_timeout_s, heartbeat_s
        self._started = self._heard = time.monotonic()  # _heard: the last heartbeat of anyone (us included)
        self._bus_quiet = False
        self._schedulers: dict[str, float] = {}  # other schedulers -> last heartbeat
        self._engines: dict[str, str] = {}  # verifier -> its engine ("exact-bfloat16"), as announced
        self._last_scan = 0.0
        self._takeover: asyncio.Task | None = None
        self._claimed: dict[str, str] = {}  # session -> the dead scheduler: claimed, adoption not finished
        self._state_down: dict[str, float] = {}  # session -> since when its Redis is unreachable
        self.metrics = metrics or SchedulerMetrics()
        self.reject = Rejections(log, lambda reason: self.metrics.rejected.labels(reason).inc())
        self._outputs: dict[str, _Output] = {}
        self._busy: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def subscribe(self) -> None:
        nc = self.nc
        await bus.subscribe(nc, subjects.REGISTRY_ANNOUNCE_ALL, cb=self.on_announce)
        await bus.subscribe(nc, subjects.REGISTRY_LEAVE_ALL, cb=self.on_leave)
        await bus.subscribe(nc, subjects.SESSIONS_OPEN, queue="schedulers", cb=self.on_open)
        await bus.subscribe(nc, subjects.SESSIONS_CLOSE, cb=self.on_close)
        await bus.subscribe(nc, subjects.stats("scheduler", self.instance_id), cb=self.on_stats)
        await self.nc.flush()

    async def on_stats(self, msg: Msg) -> None:
        p = self.policy
        counters = {"sessions": len(p.sessions), "in_flight": sum(s.in_flight for s in p.sessions.values()),
                    "queued": p.queued, "verifiers": len(p.verifiers),
                    "busy_verifiers": len(self._busy), "edges": len(p.edges),
                    "rejected": sum(self.reject.counts.values())}
        if msg.reply:
            await msg.respond(protocol.encode(ServiceStats(instance_id=self.instance_id, counters=counters,
                                                           now=time.monotonic())))

    # -- membership ---------------------------------------------------------------------

    async def on_announce(self, msg: Msg) -> None:
        """Believe an announcement only on its own subject: NATS permissions bind that subject
        (an edge's id, pool and user) to the announcer's credentials. An edge's are rate
        limited before they are decoded, and a cut-off edge's dropped."""
        role, instance = subjects.announcer(msg.subject)
        if role == "edge-agent" and (verdict := self.guard.announcement(instance, time.monotonic())) != Verdict.ADMIT:
            if verdict != Verdict.SUSPENDED:
                self._offence(instance, verdict, "an announcement")
            return
        try:
            ann = protocol.decode(msg.data, ServiceAnnouncement)
            if msg.subject != registry.announce_subject(ann):
                self.reject(Reason.IDENTITY_MISMATCH,
                            f"an announcement of {ann.role} {ann.instance_id} on {msg.subject}")
                return
            await self._seen(ann)
        except (ProtocolError, ValueError):
            self.reject(Reason.BAD_ANNOUNCEMENT, "an announcement")

    async def refresh(self) -> None:
        """Ask the bus who is there now (at start, and when no verifier is known): every
        service announces itself on its own subject, which its credentials bind to its role
        and id (`registry.discover` believes nothing else)."""
        for ann in await registry.discover(self.nc, wait_s=0.3):
            with contextlib.suppress(ValueError):
                await self._seen(ann)

    async def _seen(self, ann: ServiceAnnouncement) -> None:
        capacity = int(ann.details.get("max_sessions", "0"))
        fingerprint = ann.details.get("tokenizer_fingerprint", "")
        now = time.monotonic()
        self._heard = now
        if self._bus_quiet:
            self._bus_quiet = False
            self.policy.seen_all(now)  # nobody could heartbeat while the bus was down
            self._schedulers = dict.fromkeys(self._schedulers, now)  # nor could other schedulers
            log.info("heartbeats again: the bus is back")
        if ann.role == "scheduler":
            self._schedulers[ann.instance_id] = now
        elif ann.role == "verifier":
            self._engines[ann.instance_id] = ann.details.get("engine", "")[:64]
            free_tokens = ann.details.get("free_tokens")
            self.policy.verifier_seen(ann.instance_id, capacity, now, fingerprint,
                                      int(free_tokens) if free_tokens is not None else None)
        elif ann.role == "edge-agent":
            if not await self._listening_to(ann.instance_id, now):
                return  # cut off
            new = ann.instance_id not in self.policy.edges
            user, pool = ann.details.get("user", ""), ann.details.get("pool", "shared")
            if not self.policy.edge_seen(ann.instance_id, capacity, now, fingerprint, user, pool) and new:
                message = (f"the draft model's tokenizer ({fingerprint}) differs from every verifier's target "
                           "tokenizer: this edge gets no sessions; use a draft model of the target's family")
                log.warning("edge %s (%s) refused: %s", ann.name, ann.details.get("model", "?"), message)
                await bus.publish(self.nc, subjects.edge_refused(ann.instance_id), protocol.encode(
                    EdgeRefused(reason=Reason.TOKENIZER_MISMATCH, message=message)))
        self._wake.set()

    async def on_leave(self, msg: Msg) -> None:
        try:
            leave = protocol.decode(msg.data, ServiceLeave)
        except ProtocolError:
            self.reject(Reason.BAD_LEAVE, "a leave message")
            return
        if leave.role == "edge-agent":
            await self._stop_listening(leave.instance_id)
            await self._fall_back(leave.instance_id, self.policy.edge_gone(leave.instance_id))
        elif leave.role == "verifier":
            await self._verifier_gone(leave.instance_id, self.policy.verifier_gone(leave.instance_id))
        elif leave.role == "scheduler":
            self._schedulers.pop(leave.instance_id, None)
            self._last_scan = 0.0  # its sessions are ours to take over now

    # -- what one edge may cost (`guard`) ------------------------------------------------

    async def _listening_to(self, edge: str, now: float) -> bool:
        """Subscribe to a newly seen edge's drafts to us; False if it is cut off (here, or by
        another scheduler: the suspension is in Redis)."""
        if self.guard.suspended(edge, now):
            return False
        if edge in self._draft_subs:
            return True
        try:
            left = await self.store.edge_suspension(edge)
        except Exception as exc:  # Redis unreachable: our own record decides
            log.warning("cannot read edge %s's suspension from Redis: %r", edge, exc)
            left = 0.0
        if left > 0:
            self.guard.suspend(edge, now + left)
            return False
        if edge not in self._draft_subs:  # (another announcement may have subscribed meanwhile)
            self._draft_subs[edge] = await bus.subscribe(self.nc, subjects.drafts(edge, self.instance_id),
                                                         cb=self.on_draft)
        return True

    async def _stop_listening(self, edge: str) -> None:
        """Unsubscribe from an edge's drafts: the NATS server drops them from then on."""
        self.guard.forget(edge)
        if (sub := self._draft_subs.pop(edge, None)) is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _offence(self, edge: str, reason: str, what: str) -> None:
        """Count a refused message from an edge; the one that crosses the limit cuts it off."""
        self.reject(reason, what)
        if self.guard.offence(edge, time.monotonic()):
            self._spawn(self._cut_off(edge))  # (not in the drafts subscription's own task: it is unsubscribed)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cut_off(self, edge: str) -> None:
        """Suspend an edge for `suspend_s`: no more of its drafts reach us, its sessions go to
        other drafters (server steps until one has room), other schedulers learn it from Redis."""
        lim = self.guard.limits
        log.warning("edge %s cut off for %.0fs: %d refused messages within %.0fs", edge, lim.suspend_s,
                    lim.offence_limit, lim.window_s)
        self.metrics.edges_cut_off.inc()
        await self._stop_listening(edge)
        sessions = self.policy.edge_gone(edge)
        await self._fall_back(edge, sessions, cause="edge_cut_off")
        with contextlib.suppress(Exception):
            await bus.publish(self.nc, subjects.edge_refused(edge), protocol.encode(EdgeRefused(
                reason=Reason.CUT_OFF, message=f"too many refused messages; suspended for {lim.suspend_s:.0f}s")))
        try:
            await self.store.suspend_edge(edge, lim.suspend_s)
        except Exception as exc:
            log.warning("cannot record edge %s's suspension in Redis: %r", edge, exc)

    async def _fall_back(self, edge: str, sessions: list[str], cause: str = "edge_lost") -> None:
        self.metrics.fallbacks.labels(cause).inc(len(sessions))
        if sessions:
            log.warning("edge %s is gone (%s); %d session(s) continue with server steps until another drafter "
                        "has room", edge, cause, len(sessions))
        for sid in sessions:  # an edge that was only stalled frees them when it comes back
            await bus.publish(self.nc, subjects.edge_close(edge), protocol.encode(CloseSession(session_id=sid)))
        self._wake.set()

    async def _verifier_gone(self, verifier: str, lost: list[str]) -> None:
        log.warning("verifier %s is gone; its sessions move to other verifiers", verifier)
        for sid in lost:
            await self._fail(sid, "no verifier has room to resume the session")
        self._wake.set()

    # -- sessions -----------------------------------------------------------------------

    async def on_open(self, msg: Msg) -> None:
        try:
            request = protocol.decode(msg.data, SessionOpen)
        except ProtocolError as exc:
            self.reject(exc.reason, "a session request")
            await msg.respond(protocol.encode(SessionOpened(session_id="", error=exc.reason)))
            return
        parent = otel_context.get_current()  # the opener's span, from the message headers
        if not telemetry.enabled():
            await self._open(msg, request, parent)
            return
        with telemetry.tracer.start_as_current_span("open session", kind=SpanKind.SERVER, attributes={
                "specedge.session.id": request.session_id, "specedge.mode": request.mode,
                "specedge.prompt_tokens": len(request.tokens)}) as span:
            if (error := await self._open(msg, request, parent)) is not None:
                span.set_status(Status(StatusCode.ERROR, error))

    async def _open(self, msg: Msg, request: SessionOpen, parent: otel_context.Context) -> str | None:
        """Assign, record, prefill and hand the session to its drafter; returns an error or None."""
        sid = request.session_id
        try:
            subjects.session_tokens(sid)  # the id must be usable in a subject
            try:
                assignment = self.policy.assign(sid, len(request.tokens), request.mode, request.user)
            except NoCapacityError:
                await self.refresh()  # a verifier may have started since our last heartbeat from it
                assignment = self.policy.assign(sid, len(request.tokens), request.mode, request.user)
        except (ValueError, NoCapacityError) as exc:
            await msg.respond(protocol.encode(SessionOpened(session_id=sid, error=str(exc))))
            return str(exc)
        prefill = PrefillRequest(session_id=sid, tokens=request.tokens, sampling=request.sampling)
        try:
            await self.store.create(sid, request.tokens, request.sampling, user=request.user, mode=request.mode,
                                    scheduler=self.instance_id, verifier=assignment.verifier,
                                    edge=assignment.edge or "", max_new_tokens=request.max_new_tokens,
                                    eos_ids=request.eos_ids)
            reply = await bus.request(self.nc, subjects.verifier_prefill(assignment.verifier),
                                      protocol.encode(prefill), timeout=self.request_timeout_s)
            error = protocol.decode(reply.data, PrefillReply).error
        except Exception as exc:
            error = f"prefill failed: {exc!r}"
        if error:
            self.policy.finish(sid)
            with contextlib.suppress(Exception):
                await self.store.end(sid)
            await msg.respond(protocol.encode(SessionOpened(session_id=sid, error=error)))
            return error
        spans = SessionSpans(sid, parent)
        self._outputs[sid] = _Output(request.max_new_tokens, set(request.eos_ids), spans,
                                     tree_temperature=request.sampling.tree_temperature)
        self.policy.draft_due(sid, time.monotonic())
        spans.begin_cycle(0)
        if assignment.edge is not None:
            await bus.publish(self.nc, subjects.edge_assign(assignment.edge), protocol.encode(
                DraftAssign(session_id=sid, tokens=request.tokens, scheduler=self.instance_id,
                            **self._shape(sid))), context=spans.context)
        await msg.respond(protocol.encode(SessionOpened(session_id=sid, verifier=assignment.verifier,
                                                        edge=assignment.edge,
                                                        engine=self._engines.get(assignment.verifier, ""))))
        self._wake.set()
        return None

    async def on_close(self, msg: Msg) -> None:
        if (close := self.reject.decode(msg.data, CloseSession, "a close request")) is None:
            return
        await self._end(close.session_id)

    async def _end(self, session_id: str, error: str | None = None) -> None:
        state = self.policy.sessions.get(session_id)
        if (output := self._outputs.pop(session_id, None)) is not None:
            output.spans.close(error)
        self._state_down.pop(session_id, None)
        self.policy.finish(session_id)
        if state is None:
            return
        self._ended[session_id] = time.monotonic()
        try:
            await self.store.end(session_id)
        except Exception as exc:  # the keys expire on their own
            log.warning("could not delete session %s from Redis: %r", session_id[:16], exc)
        close = protocol.encode(CloseSession(session_id=session_id))
        await bus.publish(self.nc, subjects.verifier_close(state.verifier), close)
        if state.edge is not None:
            await bus.publish(self.nc, subjects.edge_close(state.edge), close)

    # -- drafts and batches -----------------------------------------------------------

    async def _fail(self, session_id: str, error: str) -> None:
        """End a session that cannot go on, telling its caller why."""
        output = self._outputs.get(session_id)
        if output is not None:
            log.error("session %s ends: %s", session_id[:16], error)
            event = TokenEvent(session_id=session_id, index=output.generated, tokens=[], finished=True,
                               finish_reason="error", error=error)
            await bus.publish(self.nc, subjects.session_tokens(session_id), protocol.encode(event))
        await self._end(session_id, error)

    def _shape(self, session_id: str) -> dict[str, int | float]:
        """The tree shape a session's edge is asked for on assignment, and its scoring temperature."""
        budget, depth = self.policy.shape_for(session_id)
        output = self._outputs.get(session_id)
        return {**self.draft_shape, "budget": budget, "depth": depth,
                "temperature": output.tree_temperature if output is not None else 1.0}

    async def on_draft(self, msg: Msg) -> None:
        """A draft from one edge (its own subscription): size and rate checked before it is
        decoded; anything refused is an offence (`guard`)."""
        edge, now = msg.subject.split(".")[-2], time.monotonic()
        worker = self.policy.edges.get(edge)
        verdict = self.guard.draft(edge, len(msg.data), len(worker.sessions) if worker is not None else 0, now)
        if verdict != Verdict.ADMIT:
            if verdict != Verdict.SUSPENDED:
                self._offence(edge, verdict, f"a draft from {edge}")
            return
        try:
            tree = protocol.decode(msg.data, DraftTreeMsg)
        except ProtocolError as exc:
            self._offence(edge, exc.reason, f"a draft from {edge}")
            return
        state = self.policy.sessions.get(tree.session_id)
        waiting_since = state.waiting_since if state is not None else None
        if (reason := self.policy.draft_arrived(tree, edge, now, tree.draft_ms / 1000)) is not None:
            if reason == Reason.AHEAD_UNUSED:  # sent ahead on a guess that did not come true: no offence
                self.metrics.drafts_ahead.labels("missed").inc()
            elif (reason == Reason.UNKNOWN_SESSION and tree.session_id in self._ended) or \
                    (reason == Reason.NOT_THE_SESSIONS_EDGE and state is not None and edge in state.left):
                self.reject(reason, f"a draft from {edge}")  # crossed an end or a move on the way: no offence
            else:
                self._offence(edge, reason, f"a draft from {edge}")
            return
        if state is not None and state.ahead.get(tree.cycle) is tree:
            return  # held until this cycle's result says whether its guess came true
        if tree.assumed:
            self.metrics.drafts_ahead.labels("used").inc()
        if (output := self._outputs.get(tree.session_id)) is not None:
            output.spans.draft_arrived(tree.cycle)
        self.metrics.edge_drafting.observe(tree.draft_ms / 1000)
        if waiting_since is not None:
            self.metrics.edge_round_trip.observe(now - waiting_since)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """The dispatch loop: send batches as verifiers free up; every `HOUSEKEEPING_S`
        expire silent edges and verifiers and late drafts; queue server steps."""
        housekept = 0.0
        timeout = 0.5
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            self._wake.clear()
            now = time.monotonic()
            if now - housekept >= self.HOUSEKEEPING_S:
                housekept = now
                await self._housekeeping(now)
            self.policy.server_side_trees()
            self.metrics.running.set(len(self.policy.sessions))
            self.metrics.waiting.set(self.policy.queued)
            timeout = 0.5
            for verifier in list(self.policy.verifiers):
                if verifier in self._busy:
                    continue
                batch = self.policy.next_batch(verifier, now)
                if batch:
                    self._busy.add(verifier)
                    task = asyncio.create_task(self._verify(verifier, batch))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif (wake := self.policy.next_wake(verifier, now)) is not None:
                    timeout = min(timeout, max(0.001, wake - now))

    async def _housekeeping(self, now: float) -> None:
        while self._ended and next(iter(self._ended.values())) < now - self.ENDED_MEMORY_S:
            self._ended.pop(next(iter(self._ended)))
        quiet = now - self._heard > 2 * self.heartbeat_s  # not even our own heartbeat: the bus is down
        if quiet and not self._bus_quiet:
            log.warning("no heartbeat for %.1fs, not even our own: the bus is down; nobody is expired until "
                        "it is back", now - self._heard)
        self._bus_quiet = quiet
        if not quiet:
            for edge, sessions in self.policy.expire_edges(now).items():
                await self._stop_listening(edge)
                await self._fall_back(edge, sessions)
            for verifier, lost in self.policy.expire_verifiers(now).items():
                await self._verifier_gone(verifier, lost)
            self._maybe_take_over(now)
        for edge, sessions in self.policy.expire_drafts(now).items():
            self.metrics.fallbacks.labels("draft_deadline").inc(len(sessions))
            log.warning("edge %s missed the draft deadline for %d session(s); they continue with server steps",
                        edge, len(sessions))
            for sid in sessions:
                await bus.publish(self.nc, subjects.edge_close(edge), protocol.encode(CloseSession(session_id=sid)))

    async def _verify(self, verifier: str, batch: list[DraftTreeMsg]) -> None:
        request = VerifyBatchRequest(batch_id=uuid.uuid4().hex[:12], trees=batch)
        span = batch_span(request.batch_id, verifier, batch,
                          [o.spans if (o := self._outputs.get(t.session_id)) else None for t in batch])
        try:
            data = await bus.request(self.nc, subjects.verifier_verify(verifier), protocol.encode(request),
                                     timeout=self.request_timeout_s, context=telemetry.context_of(span))
            reply = protocol.decode(data.data, VerifyBatchReply)
        except Exception as exc:
            log.warning("batch for verifier %s failed (%r); its trees wait for a verifier", verifier, exc)
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
                span.end()
            self.policy.requeue(batch)
            await asyncio.sleep(0.5)  # a dead verifier answers at once: do not spin until it expires
            return
        finally:
            self._busy.discard(verifier)
            self._wake.set()
        if span is not None:
            span.set_attributes({"specedge.verify.forward_ms": reply.forward_ms,
                                 "specedge.verify.accepted_tokens": sum(len(r.accepted) for r in reply.results),
                                 "specedge.verify.rejected": len(reply.rejected)})
            span.end()
        if reply.forward_ms > 0 and reply.results:
            self.policy.verify_timed(verifier, sum(len(t.tokens) + 1 for t in batch), reply.forward_ms / 1000)
        by_session = {t.session_id: t for t in batch}
        self._count_speculation(reply.results, by_session)
        unreachable = []  # trees of sessions whose Redis the verifier could not reach
        for rejection in reply.rejected:
            self.reject(rejection.reason, f"a tree verified by {verifier}")
            tree = by_session.get(rejection.session_id)
            if tree is None:
                continue
            if rejection.reason == Reason.STATE_UNAVAILABLE:
                unreachable.append(tree)
                continue
            if rejection.reason == Reason.STALE_CYCLE and await self._catch_up(tree):
                continue
            if not self.policy.refused(tree):
                why = _WHY.get(rejection.reason, f"the verifier keeps refusing its trees ({rejection.reason})")
                await self._fail(tree.session_id, why)
        for result in reply.results:
            tree = by_session.get(result.session_id)
            await self._deliver(result, len(tree.tokens) if tree is not None else 0)
        if unreachable:
            await self._retry_state(unreachable)

    async def _retry_state(self, trees: list[DraftTreeMsg]) -> None:
        """Sessions whose Redis was unreachable try again (a server step for the same cycle)
        every `STATE_RETRY_S`, for up to `request_timeout_s`; then they fail with that reason."""
        await asyncio.sleep(self.STATE_RETRY_S)
        now = time.monotonic()
        for tree in trees:
            since = self._state_down.setdefault(tree.session_id, now)
            if now - since > self.request_timeout_s:
                await self._fail(tree.session_id, f"the session state store (Redis) has been unreachable for "
                                                  f"{now - since:.0f}s")
            elif self.policy.refused(tree, count=False):
                self._wake.set()

    def _count_speculation(self, results: list[VerifyResult], trees: dict[str, DraftTreeMsg]) -> None:
        m = self.metrics
        if results:
            m.batch_size.observe(len(results))
        for result in results:
            tree = trees.get(result.session_id)
            m.drafts.inc()
            m.draft_tokens.inc(len(tree.tokens) if tree is not None else 0)
            m.accepted_tokens.inc(len(result.accepted))
            for position in range(len(result.accepted)):
                m.accepted_per_pos.labels(str(position)).inc()

    async def _catch_up(self, tree: DraftTreeMsg) -> bool:
        """A verifier committed this tree's cycle but its reply was lost (it died, or timed out):
        deliver that cycle from Redis instead of drafting it again. True if it did."""
        try:
            record = await self.store.load(tree.session_id)
        except Exception as exc:  # Redis unreachable: refused like any other stale tree
            log.warning("cannot read session %s from Redis: %r", tree.session_id[:16], exc)
            return False
        if record is None or record.cycle != tree.cycle + 1 or len(record.tokens) <= tree.committed_len:
            return False
        new = record.tokens[tree.committed_len:]
        await self._deliver(VerifyResult(session_id=tree.session_id, cycle=tree.cycle,
                                         committed_len=tree.committed_len, accepted=new[:-1], bonus=new[-1]),
                            len(tree.tokens))
        return True

    async def _deliver(self, result: protocol.VerifyResult, drafted: int) -> None:
        """Commit a verified cycle: its tokens (and what was drafted and accepted) to the
        caller, the result to the session's edge; end the session when it is done."""
        sid = result.session_id
        output, state = self._outputs.get(sid), self.policy.sessions.get(sid)
        if output is None or state is None:
            return  # closed meanwhile
        new = [*result.accepted, result.bonus]
        self.policy.verified(sid, new, time.monotonic())
        self._state_down.pop(sid, None)
        keep, reason = cut_output(new, output.eos_ids, output.max_new_tokens - output.generated)
        held = bool(state.ahead) and reason is None
        if (ahead := self.policy.release_ahead(sid) if held else None) is not None:
            self._wake.set()
        if held:
            self.metrics.drafts_ahead.labels("used" if ahead is not None else "missed").inc()
        move = self.policy.rehome(sid) if reason is None and not held else None
        with output.spans.delivering(result, len(keep), reason) as delivery:
            await self._emit(sid, output, keep, reason, drafted, len(result.accepted), context=delivery)
            if reason is None:
                output.spans.begin_cycle(result.cycle + 1)
                if ahead is not None:
                    output.spans.draft_arrived(ahead.cycle)
                if move is not None:
                    await self._move(move, output)
                elif state.edge is not None:
                    budget, depth = self.policy.shape_for(sid)
                    result = msgspec.structs.replace(result, next_budget=budget, next_depth=depth)
                    await bus.publish(self.nc, subjects.edge_result(state.edge), protocol.encode(result),
                                      context=output.spans.context)
        if reason is not None:
            await self._end(sid)

    async def _move(self, move: Move, output: _Output) -> None:
        """Carry out a drafter change decided by the policy at a cycle boundary: the old edge
        closes the session, the new one (if any) gets every committed token and the cycle."""
        sid = move.session_id
        self.metrics.drafter_moves.labels(move.cause).inc()
        log.info("session %s moves from %s to %s (%s)", sid[:16], move.from_edge or "server steps",
                 move.to_edge or "server steps", move.cause)
        if move.from_edge is not None:
            await bus.publish(self.nc, subjects.edge_close(move.from_edge),
                              protocol.encode(CloseSession(session_id=sid)))
        if move.to_edge is None:
            self._wake.set()
            return
        state = self.policy.sessions.get(sid)
        try:
            record = await self.store.load(sid)
        except Exception as exc:
            log.warning("cannot read session %s from Redis to move it: %r", sid[:16], exc)
            record = None
        if state is None or record is None or len(record.tokens) != state.committed_len:
            self.policy.unhome(sid)  # server steps, as before the move
            self._wake.set()
            return
        with contextlib.suppress(Exception):  # who drafts it now, should another scheduler take it over
            await self.store.assign(sid, edge=move.to_edge)
        await bus.publish(self.nc, subjects.edge_assign(move.to_edge), protocol.encode(
            DraftAssign(session_id=sid, tokens=record.tokens, scheduler=self.instance_id, cycle=state.cycle,
                        **self._shape(sid))), context=output.spans.context)
        self.policy.draft_due(sid, time.monotonic())
        self._wake.set()

    async def _emit(self, sid: str, output: _Output, keep: list[int], reason: str | None, drafted: int = 0,
                    accepted: int = 0, context: otel_context.Context | None = None) -> None:
        """Publish newly committed tokens (already cut by `cut_output`) as a `TokenEvent`, with the cycle's
        drafted and accepted counts and the trace context of `context`. Ending a finished
        session is the caller's."""
        if keep or reason is not None:
            event = TokenEvent(session_id=sid, index=output.generated, tokens=keep, finished=reason is not None,
                               finish_reason=reason, drafted=drafted, accepted=accepted)
            output.generated += len(keep)
            await bus.publish(self.nc, subjects.session_tokens(sid), protocol.encode(event), context=context)

    # -- taking over the sessions of a scheduler that died --------------------------------

    def _maybe_take_over(self, now: float) -> None:
        """Every half scheduler timeout (the `--verifier-timeout`), once we have been up long
        enough to have heard every live scheduler, look for orphaned sessions in Redis."""
        timeout = self.policy.verifier_timeout_s
        if now - self._started < timeout or now - self._last_scan < timeout / 2:
            return
        if self._takeover is not None and not self._takeover.done():
            return
        self._last_scan = now
        self._takeover = asyncio.create_task(self._take_over(now))

    async def _take_over(self, now: float) -> None:
        """Claim and go on with each session whose scheduler is silent for the timeout and that
        nothing has committed to for as long (so a scheduler we have not heard yet, just
        started, keeps its new sessions)."""
        timeout = self.policy.verifier_timeout_s
        live = {s for s, seen in self._schedulers.items() if now - seen <= timeout} | {self.instance_id}
        try:
            for sid in await self.store.session_ids():
                if sid in self.policy.sessions:
                    continue
                record = await self.store.load(sid)
                if record is None:
                    self._claimed.pop(sid, None)
                    continue
                if (dead := self._claimed.get(sid)) is None:  # (else claimed at an earlier scan, not adopted)
                    if (not record.scheduler or record.scheduler in live or record.max_new_tokens < 1
                            or record.idle_s < timeout):
                        continue  # owned by a live scheduler, not opened by one, or committed to lately
                    if not await self.store.claim(sid, record.scheduler, self.instance_id):
                        continue  # another scheduler was quicker
                    dead = self._claimed[sid] = record.scheduler
                if record.idle_s > self.ORPHAN_MAX_IDLE_S:
                    log.info("deleting abandoned session %s (scheduler %s gone, idle %.0fs)", sid[:16],
                             dead, record.idle_s)
                    await self.store.end(sid)
                else:
                    await self._adopt(dataclasses.replace(record, scheduler=dead))
                self._claimed.pop(sid, None)
        except Exception as exc:  # Redis down: try again at the next scan (a claimed session too)
            log.warning("could not look for orphaned sessions: %r", exc)

    async def _adopt(self, record) -> None:
        """Go on with a session whose scheduler died, from its Redis record: same verifier if
        it is alive (it holds the cache), a drafter as for a new session; the committed output
        is re-sent from index 0 first."""
        sid = record.session_id
        spans = SessionSpans(sid, None, adopted_from=record.scheduler)  # a trace of its own from here on
        output = self._outputs[sid] = _Output(record.max_new_tokens, set(record.eos_ids), spans,
                                              tree_temperature=record.sampling.tree_temperature)
        try:
            assignment = self.policy.assign(sid, len(record.tokens), record.mode, record.user,
                                            prefer=record.verifier or None, cycle=record.cycle)
        except (ValueError, NoCapacityError) as exc:
            await self._fail(sid, f"cannot resume the session: {exc}")
            with contextlib.suppress(Exception):
                await self.store.end(sid)
            return
        log.warning("took over session %s from scheduler %s (cycle %d, %d tokens out)", sid[:16],
                    record.scheduler, record.cycle, len(record.output))
        try:
            await self.store.assign(sid, verifier=assignment.verifier, edge=assignment.edge or "")
            if record.edge and record.edge != assignment.edge:  # it drafts for the dead scheduler
                await bus.publish(self.nc, subjects.edge_close(record.edge),
                                  protocol.encode(CloseSession(session_id=sid)), context=spans.session_context)
            keep, reason = cut_output(record.output, output.eos_ids, output.max_new_tokens - output.generated)
            await self._emit(sid, output, keep, reason, context=spans.session_context)
        except Exception:  # Redis or NATS failed half-way: let go of it, to adopt it again at the next scan
            self.policy.finish(sid)
            self._outputs.pop(sid, None)
            raise
        if reason is not None:
            await self._end(sid)
            return
        self.policy.draft_due(sid, time.monotonic())
        spans.begin_cycle(record.cycle)
        if assignment.edge is not None:
            await bus.publish(self.nc, subjects.edge_assign(assignment.edge), protocol.encode(
                DraftAssign(session_id=sid, tokens=record.tokens, scheduler=self.instance_id, cycle=record.cycle,
                            **self._shape(sid))), context=spans.context)
        self._wake.set()
