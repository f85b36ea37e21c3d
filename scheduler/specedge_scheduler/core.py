"""The scheduler's decisions: a core that takes events and returns commands.

`SchedulerCore.handle(event, now)` owns every piece of the scheduler's state — the policy's
sessions, verifiers, edges and queues, what each session has delivered, which verifiers
are busy, which edges' drafts we listen to, sessions being taken over — and answers each
event with a list of `Command`s. It does no I/O: no NATS, no Redis, no spans, no clock
(`now` comes with each event). `service.SchedulerService` turns bus messages and the
outcomes of earlier commands into events and carries the commands out; the simulator
(`specedge_bench.simulator`) and the unit tests drive this same core.

What an edge sends (announcements, drafts) comes in as the bytes that crossed the bus, so
the size and rate checks of `guard` run before anything is decoded. Logging and metrics
(in-process counters) are the only side effects.

Lifecycle of a session, as events and commands: `OpenRequested` → `CreateSession` (Redis
record, prefill) → `Prefilled` → `DraftAssign` to its drafter, `SessionOpened` to the
opener; `DraftReceived` queues trees; `Tick` dispatches batches (`Verify`) and does the
housekeeping; `BatchVerified` delivers each result (`TokenEvent` to the opener, the
`VerifyResult` to the edge) and ends finished sessions (`EndSession`, `CloseSession`s).
A scheduler that stops heartbeating has its sessions taken over: `ScanOrphans` →
`OrphanClaimed` → `RecordAssignment` → `Recorded`, after which the committed output is
re-sent from index 0 (a gateway skips what it has).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import msgspec

from specedge import protocol, registry, subjects
from specedge.metrics import SchedulerMetrics
from specedge.protocol import (
    CloseSession,
    DraftAssign,
    DraftTreeMsg,
    EdgeRefused,
    ProtocolError,
    Reason,
    Rejections,
    ServiceAnnouncement,
    ServiceLeave,
    ServiceStats,
    SessionOpen,
    SessionOpened,
    TokenEvent,
    TokenLogprob,
    VerifyResult,
    cut_output,
)
from specedge.state import SessionRecord
from specedge_scheduler.events import (
    Announced,
    BatchVerified,
    CloseRequested,
    Command,
    CreateSession,
    Discovered,
    DraftReceived,
    EndSession,
    Event,
    Left,
    Listen,
    Listening,
    LoadRecord,
    OpenRequested,
    OrphanClaimed,
    OrphanGone,
    Prefilled,
    Publish,
    RecordAssignment,
    Recorded,
    RecordLoaded,
    Rediscover,
    ScanDone,
    ScanOrphans,
    StatsRequested,
    StopListening,
    SuspendEdge,
    Tick,
    TraceCycle,
    TraceDelivered,
    TraceDelivery,
    TraceDraft,
    TraceEnd,
    TraceOf,
    TraceSession,
    Verify,
)
from specedge_scheduler.guard import EdgeGuard, Verdict
from specedge_scheduler.policy import Assignment, Move, NoCapacityError, SchedulingPolicy

log = logging.getLogger("specedge_scheduler")


def orphaned(record: SessionRecord, live: frozenset[str], timeout_s: float) -> bool:
    """Whether a session is another scheduler's to take over: opened by a scheduler that is
    not live, with output still to come, and nothing committed to it for `timeout_s` (so a
    scheduler not heard from yet, just started, keeps its new sessions)."""
    return bool(record.scheduler) and record.scheduler not in live and record.max_new_tokens >= 1 \
        and record.idle_s >= timeout_s


@dataclass
class SessionOutput:
    """What the opener asked of a session's output, and how much it has been sent."""

    max_new_tokens: int
    eos_ids: frozenset[int]
    tree_temperature: float = 1.0  # its drafts' scoring temperature (from its sampling)
    generated: int = 0
    grammar: str = ""  # its structured output, which its edge drafts by too
    end_ids: list[int] = dataclasses.field(default_factory=list)  # with a grammar: the tokens that end it


_WHY = {Reason.UNKNOWN_SESSION: "its state is gone from Redis (expired, or Redis restarted without persistence)",
        Reason.STALE_CYCLE: "its state in Redis is behind what was verified (Redis lost recent writes)"}


class SchedulerCore:
    """All of one scheduler's state and decisions; `handle` is the only entry point."""

    def __init__(self, instance_id: str, policy: SchedulingPolicy, draft_shape: dict[str, int], *,
                 guard: EdgeGuard | None = None, metrics: SchedulerMetrics | None = None,
                 request_timeout_s: float = 30.0, heartbeat_s: float = 2.0, now: float = 0.0) -> None:
        self.instance_id, self.policy, self.draft_shape = instance_id, policy, draft_shape
        self.tuning = policy.tuning
        self.guard = guard or EdgeGuard()
        self.metrics = metrics or SchedulerMetrics()
        self.reject = Rejections(log, lambda reason: self.metrics.rejected.labels(reason).inc())
        self.request_timeout_s, self.heartbeat_s = request_timeout_s, heartbeat_s
        self.outputs: dict[str, SessionOutput] = {}
        self.busy: set[str] = set()  # verifiers with a batch out
        self.wake_at = now  # when `Tick` should come next at the latest
        self._resting: dict[str, float] = {}  # verifier -> no batch before (its last one failed)
        self._listening: set[str] = set()  # edges whose drafts to us we are subscribed to
        self._ended: dict[str, float] = {}  # sessions ended lately: a draft already on its way is no offence
        self._opening: dict[str, tuple[OpenRequested, SessionOpen]] = {}  # sessions being prefilled
        self._started = self._heard = now  # _heard: the last heartbeat of anyone (us included)
        self._bus_quiet = False
        self._schedulers: dict[str, float] = {}  # other schedulers -> last heartbeat
        self._engines: dict[str, str] = {}  # verifier -> its engine ("exact-bfloat16"), as announced
        self._housekept = self._last_scan = -math.inf
        self._scanning = False
        self._claimed: dict[str, str] = {}  # session -> the dead scheduler: claimed, adoption not finished
        self._adopting: dict[str, tuple[SessionRecord, Assignment, str]] = {}  # (record, where, dead scheduler)
        self._state_down: dict[str, float] = {}  # session -> since when its Redis is unreachable
        self._retries: list[tuple[float, DraftTreeMsg]] = []  # (when, tree) of sessions whose Redis was unreachable

    def handle(self, event: Event, now: float) -> list[Command]:
        match event:
            case Tick():
                return self._tick(now)
            case DraftReceived():
                return self._draft(event, now)
            case BatchVerified():
                return self._verified(event, now)
            case Announced():
                return self._announced(event, now)
            case Discovered():
                try:
                    return self._seen(event.announcement, now)
                except ValueError:
                    return []
            case Listening():
                return self._listening_to(event, now)
            case Left():
                return self._left(event, now)
            case OpenRequested():
                return self._open(event)
            case Prefilled():
                return self._prefilled(event, now)
            case CloseRequested():
                close = self.reject.decode(event.data, CloseSession, "a close request")
                return self._end(close.session_id, now) if close is not None else []
            case StatsRequested():
                return self._stats(event, now)
            case RecordLoaded(purpose="catch_up"):
                return self._catch_up(event, now)
            case RecordLoaded(purpose="move"):
                return self._moved(event, now)
            case OrphanClaimed():
                return self._orphan(event, now)
            case OrphanGone():
                self._claimed.pop(event.session_id, None)
                return []
            case ScanDone():
                self._scanning = False
                return []
            case Recorded():
                return self._adopted(event, now)
        raise TypeError(f"not a scheduler event: {event!r}")

    # -- membership ---------------------------------------------------------------------

    def _announced(self, event: Announced, now: float) -> list[Command]:
        """Believe an announcement only on its own subject: NATS permissions bind that subject
        (an edge's id, pool and user) to the announcer's credentials. An edge's are rate
        limited before they are decoded, and a cut-off edge's dropped."""
        role, instance = subjects.announcer(event.subject)
        if role == "edge-agent" and (verdict := self.guard.announcement(instance, now)) != Verdict.ADMIT:
            return self._offence(instance, verdict, "an announcement", now) if verdict != Verdict.SUSPENDED else []
        try:
            ann = protocol.decode(event.data, ServiceAnnouncement)
            if event.subject != registry.announce_subject(ann):
                self.reject(Reason.IDENTITY_MISMATCH, f"an announcement of {ann.role} {ann.instance_id} "
                                                      f"on {event.subject}")
                return []
            return self._seen(ann, now)
        except (ProtocolError, ValueError):
            self.reject(Reason.BAD_ANNOUNCEMENT, "an announcement")
            return []

    def _seen(self, ann: ServiceAnnouncement, now: float) -> list[Command]:
        capacity = int(ann.details.get("max_sessions", "0"))
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
            self.policy.verifier_seen(ann.instance_id, capacity, now, ann.details.get("tokenizer_fingerprint", ""),
                                      int(free_tokens) if free_tokens is not None else None)
        elif ann.role == "edge-agent":
            if self.guard.suspended(ann.instance_id, now):
                return []
            if ann.instance_id not in self._listening:
                return [Listen(ann.instance_id, ann)]
            return self._edge_seen(ann, now)
        return []

    def _listening_to(self, event: Listening, now: float) -> list[Command]:
        edge = event.edge
        if event.suspended_s > 0:  # cut off by another scheduler
            self.guard.suspend(edge, now + event.suspended_s)
            return []
        self._listening.add(edge)
        if self.guard.suspended(edge, now):  # cut off meanwhile
            return self._stop_listening(edge)
        try:
            return self._edge_seen(event.announcement, now)
        except ValueError:
            self.reject(Reason.BAD_ANNOUNCEMENT, "an announcement")
            return []

    def _edge_seen(self, ann: ServiceAnnouncement, now: float) -> list[Command]:
        capacity = int(ann.details.get("max_sessions", "0"))
        fingerprint = ann.details.get("tokenizer_fingerprint", "")
        new = ann.instance_id not in self.policy.edges
        user, pool = ann.details.get("user", ""), ann.details.get("pool", "shared")
        if self.policy.edge_seen(ann.instance_id, capacity, now, fingerprint, user, pool) or not new:
            return []
        message = (f"the draft model's tokenizer ({fingerprint}) differs from every verifier's target "
                   "tokenizer: this edge gets no sessions; use a draft model of the target's family")
        log.warning("edge %s (%s) refused: %s", ann.name, ann.details.get("model", "?"), message)
        return [Publish(subjects.edge_refused(ann.instance_id),
                        EdgeRefused(reason=Reason.TOKENIZER_MISMATCH, message=message))]

    def _left(self, event: Left, now: float) -> list[Command]:
        try:
            leave = protocol.decode(event.data, ServiceLeave)
        except ProtocolError:
            self.reject(Reason.BAD_LEAVE, "a leave message")
            return []
        if leave.role == "edge-agent":
            return self._stop_listening(leave.instance_id) + \
                self._fall_back(leave.instance_id, self.policy.edge_gone(leave.instance_id))
        if leave.role == "verifier":
            return self._verifier_gone(leave.instance_id, self.policy.verifier_gone(leave.instance_id), now)
        if leave.role == "scheduler":
            self._schedulers.pop(leave.instance_id, None)
            self._last_scan = -math.inf  # its sessions are ours to take over now
        return []

    def _fall_back(self, edge: str, sessions: list[str], cause: str = "edge_lost") -> list[Command]:
        self.metrics.fallbacks.labels(cause).inc(len(sessions))
        if sessions:
            log.warning("edge %s is gone (%s); %d session(s) continue with server steps until another drafter "
                        "has room", edge, cause, len(sessions))
        # (an edge that was only stalled frees them when it comes back)
        return [Publish(subjects.edge_close(edge), CloseSession(session_id=sid)) for sid in sessions]

    def _verifier_gone(self, verifier: str, lost: list[str], now: float) -> list[Command]:
        log.warning("verifier %s is gone; its sessions move to other verifiers", verifier)
        return [c for sid in lost for c in self._fail(sid, "no verifier has room to resume the session", now)]

    # -- what one edge may cost (`guard`) ------------------------------------------------

    def _stop_listening(self, edge: str) -> list[Command]:
        """Unsubscribe from an edge's drafts: the NATS server drops them from then on."""
        self.guard.forget(edge)
        if edge not in self._listening:
            return []
        self._listening.discard(edge)
        return [StopListening(edge)]

    def _offence(self, edge: str, reason: str, what: str, now: float) -> list[Command]:
        """Count a refused message from an edge; the one that crosses the limit cuts it off."""
        self.reject(reason, what)
        return self._cut_off(edge) if self.guard.offence(edge, now) else []

    def _cut_off(self, edge: str) -> list[Command]:
        """Suspend an edge for `suspend_s`: no more of its drafts reach us, its sessions go to
        other drafters (server steps until one has room), other schedulers learn it from Redis."""
        lim = self.guard.limits
        log.warning("edge %s cut off for %.0fs: %d refused messages within %.0fs", edge, lim.suspend_s,
                    lim.offence_limit, lim.window_s)
        self.metrics.edges_cut_off.inc()
        return [*self._stop_listening(edge), *self._fall_back(edge, self.policy.edge_gone(edge), "edge_cut_off"),
                Publish(subjects.edge_refused(edge), EdgeRefused(
                    reason=Reason.CUT_OFF, message=f"too many refused messages; suspended for {lim.suspend_s:.0f}s")),
                SuspendEdge(edge, lim.suspend_s)]

    # -- sessions -----------------------------------------------------------------------

    def _open(self, event: OpenRequested) -> list[Command]:
        """Assign a verifier and a drafter, then record and prefill (`CreateSession`)."""
        try:
            request = protocol.decode(event.data, SessionOpen, protocol.MAX_SESSION_MESSAGE_BYTES)
        except ProtocolError as exc:
            self.reject(exc.reason, "a session request")
            return [Publish(event.reply, SessionOpened(session_id="", error=exc.reason))]
        sid = request.session_id
        try:
            subjects.session_tokens(sid)  # the id must be usable in a subject
            assignment = self.policy.assign(sid, len(request.tokens), request.mode, request.user)
        except NoCapacityError as exc:
            if not event.retried:  # a verifier may have started since our last heartbeat from it
                return [Rediscover(dataclasses.replace(event, retried=True))]
            return [Publish(event.reply, SessionOpened(session_id=sid, error=str(exc)))]
        except ValueError as exc:
            return [Publish(event.reply, SessionOpened(session_id=sid, error=str(exc)))]
        self._opening[sid] = (event, request)
        return [CreateSession(request, assignment.verifier, assignment.edge or "")]

    def _prefilled(self, event: Prefilled, now: float) -> list[Command]:
        """Hand a prefilled session to its drafter and answer the opener."""
        sid = event.session_id
        if sid not in self._opening:
            return []
        opening, request = self._opening.pop(sid)
        state = self.policy.sessions.get(sid)
        error = event.error or (None if state is not None else "the session's verifier is gone")
        if error:
            self.policy.finish(sid)
            return [EndSession(sid), Publish(opening.reply, SessionOpened(session_id=sid, error=error))]
        self.outputs[sid] = SessionOutput(request.max_new_tokens, frozenset(request.eos_ids),
                                          request.sampling.tree_temperature, grammar=request.sampling.grammar,
                                          end_ids=list(request.sampling.end_ids))
        self.policy.draft_due(sid, now)
        commands: list[Command] = [TraceSession(sid, opening.trace_parent), TraceCycle(sid, 0)]
        if state.edge is not None:
            commands.append(Publish(subjects.edge_assign(state.edge), DraftAssign(
                session_id=sid, tokens=request.tokens, scheduler=self.instance_id, **self._shape(sid)), sid, "cycle"))
        commands.append(Publish(opening.reply, SessionOpened(session_id=sid, verifier=state.verifier,
                                                             edge=state.edge,
                                                             engine=self._engines.get(state.verifier, ""))))
        return commands

    def _end(self, session_id: str, now: float, error: str | None = None) -> list[Command]:
        state = self.policy.sessions.get(session_id)
        commands: list[Command] = []
        if self.outputs.pop(session_id, None) is not None:
            commands.append(TraceEnd(session_id, error))
        self._state_down.pop(session_id, None)
        self.policy.finish(session_id)
        if state is None:
            return commands
        self._ended[session_id] = now
        close = CloseSession(session_id=session_id)
        commands += [EndSession(session_id), Publish(subjects.verifier_close(state.verifier), close)]
        if state.edge is not None:
            commands.append(Publish(subjects.edge_close(state.edge), close))
        return commands

    def _fail(self, session_id: str, error: str, now: float) -> list[Command]:
        """End a session that cannot go on, telling its caller why."""
        commands: list[Command] = []
        if (output := self.outputs.get(session_id)) is not None:
            log.error("session %s ends: %s", session_id[:16], error)
            commands.append(Publish(subjects.session_tokens(session_id), TokenEvent(
                session_id=session_id, index=output.generated, tokens=[], finished=True, finish_reason="error",
                error=error)))
        return commands + self._end(session_id, now, error)

    def _shape(self, session_id: str) -> dict[str, object]:
        """The tree shape a session's edge is asked for on assignment, its scoring
        temperature, and the grammar its trees follow (a structured output)."""
        budget, depth = self.policy.shape_for(session_id)
        output = self.outputs.get(session_id)
        shape = {**self.draft_shape, "budget": budget, "depth": depth,
                 "temperature": output.tree_temperature if output is not None else 1.0}
        if output is not None and output.grammar:
            shape |= {"grammar": output.grammar, "end_ids": output.end_ids}
        return shape

    def _stats(self, event: StatsRequested, now: float) -> list[Command]:
        p = self.policy
        counters = {"sessions": len(p.sessions), "in_flight": sum(s.in_flight for s in p.sessions.values()),
                    "queued": p.queued, "verifiers": len(p.verifiers), "busy_verifiers": len(self.busy),
                    "edges": len(p.edges), "rejected": sum(self.reject.counts.values())}
        return [Publish(event.reply, ServiceStats(instance_id=self.instance_id, counters=counters, now=now))]

    # -- drafts and batches -----------------------------------------------------------

    def _draft(self, event: DraftReceived, now: float) -> list[Command]:
        """A draft from one edge: size and rate checked before it is decoded; anything
        refused is an offence (`guard`), unless it crossed an end or a move on its way."""
        edge = event.subject.split(".")[-2]
        worker = self.policy.edges.get(edge)
        verdict = self.guard.draft(edge, len(event.data), len(worker.sessions) if worker is not None else 0, now)
        if verdict != Verdict.ADMIT:
            return self._offence(edge, verdict, f"a draft from {edge}", now) if verdict != Verdict.SUSPENDED else []
        try:
            tree = protocol.decode(event.data, DraftTreeMsg)
        except ProtocolError as exc:
            return self._offence(edge, exc.reason, f"a draft from {edge}", now)
        state = self.policy.sessions.get(tree.session_id)
        waiting_since = state.waiting_since if state is not None else None
        if (reason := self.policy.draft_arrived(tree, edge, now, tree.draft_ms / 1000)) is not None:
            if reason == Reason.AHEAD_UNUSED:  # sent ahead on a guess that did not come true: no offence
                self.metrics.drafts_ahead.labels("missed").inc()
            elif (reason == Reason.UNKNOWN_SESSION and tree.session_id in self._ended) or \
                    (reason == Reason.NOT_THE_SESSIONS_EDGE and state is not None and edge in state.left):
                self.reject(reason, f"a draft from {edge}")
            else:
                return self._offence(edge, reason, f"a draft from {edge}", now)
            return []
        if state is not None and state.ahead.get(tree.cycle) is tree:
            return []  # held until this cycle's result says whether its guess came true
        if tree.assumed:
            self.metrics.drafts_ahead.labels("used").inc()
        self.metrics.edge_drafting.observe(tree.draft_ms / 1000)
        if waiting_since is not None:
            self.metrics.edge_round_trip.observe(now - waiting_since)
        return [TraceDraft(tree.session_id, tree.cycle)] if tree.session_id in self.outputs else []

    def _tick(self, now: float) -> list[Command]:
        """Housekeeping every `housekeeping_s`, due retries, server steps, then a batch for
        every free verifier that has one ready."""
        commands: list[Command] = []
        if now - self._housekept >= self.tuning.housekeeping_s:
            self._housekept = now
            commands += self._housekeeping(now)
        commands += self._retry_due(now)
        policy = self.policy
        policy.server_side_trees()
        self.metrics.running.set(len(policy.sessions))
        self.metrics.waiting.set(policy.queued)
        wake = now + 0.5
        if self._retries:
            wake = min(wake, min(when for when, _ in self._retries))
        for verifier in list(policy.verifiers):
            if verifier in self.busy:
                continue
            if (rest := self._resting.get(verifier)) is not None:
                if rest > now:
                    wake = min(wake, rest)
                    continue
                del self._resting[verifier]
            if batch := policy.next_batch(verifier, now):
                self.busy.add(verifier)
                commands.append(Verify(verifier, tuple(batch)))
            elif (due := policy.next_wake(verifier, now)) is not None:
                wake = min(wake, due)
        self.wake_at = max(wake, now + 0.001)
        return commands

    def _housekeeping(self, now: float) -> list[Command]:
        while self._ended and next(iter(self._ended.values())) < now - self.tuning.ended_memory_s:
            self._ended.pop(next(iter(self._ended)))
        quiet = now - self._heard > 2 * self.heartbeat_s  # not even our own heartbeat: the bus is down
        if quiet and not self._bus_quiet:
            log.warning("no heartbeat for %.1fs, not even our own: the bus is down; nobody is expired until "
                        "it is back", now - self._heard)
        self._bus_quiet = quiet
        commands: list[Command] = []
        if not quiet:
            for edge, sessions in self.policy.expire_edges(now).items():
                commands += self._stop_listening(edge) + self._fall_back(edge, sessions)
            for verifier, lost in self.policy.expire_verifiers(now).items():
                commands += self._verifier_gone(verifier, lost, now)
            commands += self._maybe_take_over(now)
        for edge, sessions in self.policy.expire_drafts(now).items():
            self.metrics.fallbacks.labels("draft_deadline").inc(len(sessions))
            log.warning("edge %s missed the draft deadline for %d session(s); they continue with server steps",
                        edge, len(sessions))
            commands += [Publish(subjects.edge_close(edge), CloseSession(session_id=sid)) for sid in sessions]
        return commands

    def _verified(self, event: BatchVerified, now: float) -> list[Command]:
        verifier, reply = event.verifier, event.reply
        self.busy.discard(verifier)
        if reply is None:
            log.warning("batch for verifier %s failed (%s); its trees wait for a verifier", verifier, event.error)
            self.policy.requeue(list(event.trees))
            self._resting[verifier] = now + self.tuning.failed_batch_rest_s  # a dead one answers at once
            return []
        if reply.forward_ms > 0 and reply.results:
            self.policy.verify_timed(verifier, sum(len(t.tokens) + 1 for t in event.trees), reply.forward_ms / 1000)
        by_session = {t.session_id: t for t in event.trees}
        self._count_speculation(reply.results, by_session)
        commands: list[Command] = []
        for rejection in reply.rejected:
            self.reject(rejection.reason, f"a tree verified by {verifier}")
            if (tree := by_session.get(rejection.session_id)) is None:
                continue
            if rejection.reason == Reason.STATE_UNAVAILABLE:  # its Redis was unreachable: try again
                self._retries.append((now + self.tuning.state_retry_s, tree))
            elif rejection.reason == Reason.STALE_CYCLE:  # perhaps committed, its reply lost: `_catch_up`
                commands.append(LoadRecord(tree.session_id, "catch_up", tree=tree))
            else:
                commands += self._refused(tree, rejection.reason, now)
        for result in reply.results:
            tree = by_session.get(result.session_id)
            commands += self._deliver(result, len(tree.tokens) if tree is not None else 0, now)
        return commands

    def _refused(self, tree: DraftTreeMsg, reason: str, now: float) -> list[Command]:
        """A server step replaces a refused tree, unless the session keeps being refused."""
        if self.policy.refused(tree):
            return []
        return self._fail(tree.session_id, _WHY.get(reason, f"the verifier keeps refusing its trees ({reason})"),
                          now)

    def _retry_due(self, now: float) -> list[Command]:
        """Sessions whose Redis was unreachable try again (a server step for the same cycle)
        every `state_retry_s`, for up to `request_timeout_s`; then they fail with that reason."""
        due = [tree for when, tree in self._retries if when <= now]
        if not due:
            return []
        self._retries = [(when, tree) for when, tree in self._retries if when > now]
        commands: list[Command] = []
        for tree in due:
            since = self._state_down.setdefault(tree.session_id, now)
            if now - since > self.request_timeout_s:
                commands += self._fail(tree.session_id, f"the session state store (Redis) has been unreachable "
                                                        f"for {now - since:.0f}s", now)
            else:
                self.policy.refused(tree, count=False)
        return commands

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

    def _catch_up(self, event: RecordLoaded, now: float) -> list[Command]:
        """A verifier committed this tree's cycle but its reply was lost (it died, or timed out):
        deliver that cycle from Redis instead of drafting it again; else the tree is refused."""
        tree, record = event.tree, event.record
        if record is None or record.cycle != tree.cycle + 1 or len(record.tokens) <= tree.committed_len:
            return self._refused(tree, Reason.STALE_CYCLE, now)
        new = record.tokens[tree.committed_len:]
        return self._deliver(VerifyResult(session_id=tree.session_id, cycle=tree.cycle,
                                          committed_len=tree.committed_len, accepted=new[:-1], bonus=new[-1]),
                             len(tree.tokens), now)

    def _deliver(self, result: VerifyResult, drafted: int, now: float) -> list[Command]:
        """Commit a verified cycle: its tokens (and what was drafted and accepted) to the
        caller, the result to the session's edge; end the session when it is done."""
        sid = result.session_id
        output, state = self.outputs.get(sid), self.policy.sessions.get(sid)
        if output is None or state is None:
            return []  # closed meanwhile
        new = [*result.accepted, result.bonus]
        self.policy.verified(sid, new, now)
        self._state_down.pop(sid, None)
        keep, reason = cut_output(new, output.eos_ids, output.max_new_tokens - output.generated)
        held = bool(state.ahead) and reason is None
        ahead = self.policy.release_ahead(sid) if held else None
        if held:
            self.metrics.drafts_ahead.labels("used" if ahead is not None else "missed").inc()
        move = self.policy.rehome(sid) if reason is None and not held else None
        commands: list[Command] = [TraceDelivery(sid, len(result.accepted), len(keep), reason),
                                   *self._emit(sid, output, keep, reason, drafted, len(result.accepted), "delivery",
                                               result.logprobs[:len(keep)])]
        if reason is None:
            commands.append(TraceCycle(sid, result.cycle + 1))
            if ahead is not None:
                commands.append(TraceDraft(sid, ahead.cycle))
            if move is not None:
                commands += self._move(move)
            elif state.edge is not None:
                budget, depth = self.policy.shape_for(sid)
                commands.append(Publish(subjects.edge_result(state.edge), msgspec.structs.replace(
                    result, next_budget=budget, next_depth=depth), sid, "cycle"))
        commands.append(TraceDelivered(sid))
        if reason is not None:
            commands += self._end(sid, now)
        return commands

    def _move(self, move: Move) -> list[Command]:
        """Carry out a drafter change decided by the policy at a cycle boundary: the old edge
        closes the session; the new one (if any) gets every committed token (`_moved`)."""
        sid = move.session_id
        self.metrics.drafter_moves.labels(move.cause).inc()
        log.info("session %s moves from %s to %s (%s)", sid[:16], move.from_edge or "server steps",
                 move.to_edge or "server steps", move.cause)
        commands: list[Command] = []
        if move.from_edge is not None:
            commands.append(Publish(subjects.edge_close(move.from_edge), CloseSession(session_id=sid)))
        if move.to_edge is not None:
            commands.append(LoadRecord(sid, "move", move=move))
        return commands

    def _moved(self, event: RecordLoaded, now: float) -> list[Command]:
        sid, move, record = event.session_id, event.move, event.record
        state = self.policy.sessions.get(sid)
        if state is None or state.edge != move.to_edge:
            return []  # ended, or moved again, meanwhile
        if record is None or len(record.tokens) != state.committed_len:
            self.policy.unhome(sid)  # server steps, as before the move
            return []
        self.policy.draft_due(sid, now)
        return [RecordAssignment(sid, None, move.to_edge),  # who drafts it, should another scheduler take over
                Publish(subjects.edge_assign(move.to_edge), DraftAssign(
                    session_id=sid, tokens=record.tokens, scheduler=self.instance_id, cycle=state.cycle,
                    prompt_len=record.prompt_len or None, **self._shape(sid)), sid, "cycle")]

    def _emit(self, sid: str, output: SessionOutput, keep: list[int], reason: str | None, drafted: int = 0,
              accepted: int = 0, trace: TraceOf | None = None,
              logprobs: list[TokenLogprob] | None = None) -> list[Command]:
        """Newly committed tokens (already cut by `cut_output`) as a `TokenEvent`, with the
        cycle's drafted and accepted counts and (when asked) their logprobs. Ending a
        finished session is the caller's."""
        if not keep and reason is None:
            return []
        event = TokenEvent(session_id=sid, index=output.generated, tokens=keep, finished=reason is not None,
                           finish_reason=reason, drafted=drafted, accepted=accepted, logprobs=logprobs or [])
        output.generated += len(keep)
        return [Publish(subjects.session_tokens(sid), event, sid, trace)]

    # -- taking over the sessions of a scheduler that died --------------------------------

    def _maybe_take_over(self, now: float) -> list[Command]:
        """Every half scheduler timeout (the `--verifier-timeout`), once we have been up long
        enough to have heard every live scheduler, look for orphaned sessions in Redis."""
        timeout = self.policy.verifier_timeout_s
        if self._scanning or now - self._started < timeout or now - self._last_scan < timeout / 2:
            return []
        self._last_scan, self._scanning = now, True
        live = {s for s, seen in self._schedulers.items() if now - seen <= timeout} | {self.instance_id}
        return [ScanOrphans(frozenset(self.policy.sessions) | frozenset(self._adopting), frozenset(live),
                            tuple(self._claimed.items()), timeout)]

    def _orphan(self, event: OrphanClaimed, now: float) -> list[Command]:
        """Delete an orphan nobody has committed to for `orphan_max_idle_s`; go on with any other:
        same verifier if it is alive (it holds the cache), a drafter as for a new session."""
        record, sid = event.record, event.record.session_id
        if sid in self.policy.sessions or sid in self._adopting:
            return []
        self._claimed[sid] = event.dead
        if record.idle_s > self.tuning.orphan_max_idle_s:
            log.info("deleting abandoned session %s (scheduler %s gone, idle %.0fs)", sid[:16], event.dead,
                     record.idle_s)
            del self._claimed[sid]
            return [EndSession(sid)]
        output = SessionOutput(record.max_new_tokens, frozenset(record.eos_ids), record.sampling.tree_temperature,
                               grammar=record.sampling.grammar, end_ids=list(record.sampling.end_ids))
        try:
            assignment = self.policy.assign(sid, len(record.tokens), record.mode, record.user,
                                            prefer=record.verifier or None, cycle=record.cycle)
        except (ValueError, NoCapacityError) as exc:
            del self._claimed[sid]
            error = f"cannot resume the session: {exc}"
            log.error("session %s ends: %s", sid[:16], error)
            return [Publish(subjects.session_tokens(sid), TokenEvent(
                session_id=sid, index=0, tokens=[], finished=True, finish_reason="error", error=error)),
                EndSession(sid)]
        self.outputs[sid] = output
        self._adopting[sid] = (record, assignment, event.dead)
        return [TraceSession(sid, None, adopted_from=event.dead),
                RecordAssignment(sid, assignment.verifier, assignment.edge or "", confirm=True)]

    def _adopted(self, event: Recorded, now: float) -> list[Command]:
        """The taken-over session is ours in Redis: re-send its committed output from index 0
        (a gateway that missed some fills the gap), then go on as for a new session. Not
        recorded (Redis failed): let go of it, to adopt it again at the next scan."""
        sid = event.session_id
        if (adopting := self._adopting.pop(sid, None)) is None:
            return []
        record, assignment, dead = adopting
        output = self.outputs[sid]
        if not event.ok:
            self.policy.finish(sid)
            self.outputs.pop(sid, None)
            return [TraceEnd(sid)]
        self._claimed.pop(sid, None)
        log.warning("took over session %s from scheduler %s (cycle %d, %d tokens out)", sid[:16],
                    dead, record.cycle, len(record.output))
        commands: list[Command] = []
        if record.edge and record.edge != assignment.edge:  # it drafts for the dead scheduler
            commands.append(Publish(subjects.edge_close(record.edge), CloseSession(session_id=sid), sid, "session"))
        keep, reason = cut_output(record.output, output.eos_ids, output.max_new_tokens - output.generated)
        commands += self._emit(sid, output, keep, reason, trace="session")
        if reason is not None:
            return commands + self._end(sid, now)
        self.policy.draft_due(sid, now)
        commands.append(TraceCycle(sid, record.cycle))
        if assignment.edge is not None:
            commands.append(Publish(subjects.edge_assign(assignment.edge), DraftAssign(
                session_id=sid, tokens=record.tokens, scheduler=self.instance_id, cycle=record.cycle,
                prompt_len=record.prompt_len or None, **self._shape(sid)), sid, "cycle"))
        return commands
