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
losing or repeating a token. Decisions live in the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from specedge import protocol, registry, subjects
from specedge.metrics import SchedulerMetrics
from specedge.protocol import (
    CloseSession,
    DraftAssign,
    DraftTreeMsg,
    EdgeRefused,
    PrefillReply,
    PrefillRequest,
    ProtocolError,
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
)
from specedge.state import SessionStore
from specedge_scheduler.policy import NoCapacityError, SchedulingPolicy

log = logging.getLogger("specedge_scheduler")


@dataclass
class _Output:
    max_new_tokens: int
    eos_ids: set[int]
    generated: int = 0


class SchedulerService:
    HOUSEKEEPING_S = 0.1

    def __init__(self, nc: Client, instance_id: str, store: SessionStore, policy: SchedulingPolicy,
                 draft_shape: dict[str, int], request_timeout_s: float = 30.0,
                 metrics: SchedulerMetrics | None = None) -> None:
        self.nc, self.instance_id, self.store = nc, instance_id, store
        self.policy, self.draft_shape = policy, draft_shape
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics or SchedulerMetrics()
        self.reject = Rejections(log, lambda reason: self.metrics.rejected.labels(reason).inc())
        self._outputs: dict[str, _Output] = {}
        self._busy: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def subscribe(self) -> None:
        await self.nc.subscribe(subjects.REGISTRY_ANNOUNCE_ALL, cb=self.on_announce)
        await self.nc.subscribe(subjects.REGISTRY_LEAVE_ALL, cb=self.on_leave)
        await self.nc.subscribe(subjects.SESSIONS_OPEN, queue="schedulers", cb=self.on_open)
        await self.nc.subscribe(subjects.SESSIONS_CLOSE, cb=self.on_close)
        await self.nc.subscribe(subjects.drafts_for(self.instance_id), cb=self.on_draft)
        await self.nc.subscribe(subjects.stats("scheduler", self.instance_id), cb=self.on_stats)
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
        (an edge's id, pool and user) to the announcer's credentials."""
        try:
            ann = protocol.decode(msg.data, ServiceAnnouncement)
            if msg.subject != registry.announce_subject(ann):
                self.reject("identity_mismatch", f"an announcement of {ann.role} {ann.instance_id} on {msg.subject}")
                return
            await self._seen(ann)
        except (ProtocolError, ValueError):
            self.reject("bad_announcement", "an announcement")

    async def refresh(self) -> None:
        """Ask the bus who is there now (at start, and when no verifier is known).

        Edges' discovery replies are not believed (a reply's subject binds nobody); edges
        are learnt from their announcements, within one heartbeat."""
        for ann in await registry.discover(self.nc, wait_s=0.3):
            if ann.role != "edge-agent":
                with contextlib.suppress(ValueError):
                    await self._seen(ann)

    async def _seen(self, ann: ServiceAnnouncement) -> None:
        capacity = int(ann.details.get("max_sessions", "0"))
        fingerprint = ann.details.get("tokenizer_fingerprint", "")
        now = time.monotonic()
        if ann.role == "verifier":
            self.policy.verifier_seen(ann.instance_id, capacity, now, fingerprint)
        elif ann.role == "edge-agent":
            new = ann.instance_id not in self.policy.edges
            user, pool = ann.details.get("user", ""), ann.details.get("pool", "shared")
            if not self.policy.edge_seen(ann.instance_id, capacity, now, fingerprint, user, pool) and new:
                message = (f"the draft model's tokenizer ({fingerprint}) differs from every verifier's target "
                           "tokenizer: this edge gets no sessions; use a draft model of the target's family")
                log.warning("edge %s (%s) refused: %s", ann.name, ann.details.get("model", "?"), message)
                await self.nc.publish(subjects.edge_refused(ann.instance_id), protocol.encode(
                    EdgeRefused(reason="tokenizer_mismatch", message=message)))
        self._wake.set()

    async def on_leave(self, msg: Msg) -> None:
        try:
            leave = protocol.decode(msg.data, ServiceLeave)
        except ProtocolError:
            self.reject("bad_leave", "a leave message")
            return
        if leave.role == "edge-agent":
            self._fall_back(leave.instance_id, self.policy.edge_gone(leave.instance_id))
        elif leave.role == "verifier":
            await self._verifier_gone(leave.instance_id, self.policy.verifier_gone(leave.instance_id))

    def _fall_back(self, edge: str, sessions: list[str]) -> None:
        self.metrics.fallbacks.labels("edge_lost").inc(len(sessions))
        if sessions:
            log.warning("edge %s is gone; %d session(s) continue with server steps", edge, len(sessions))
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
            return
        prefill = PrefillRequest(session_id=sid, tokens=request.tokens, sampling=request.sampling)
        try:
            await self.store.create(sid, request.tokens, request.sampling, user=request.user, mode=request.mode,
                                    scheduler=self.instance_id, verifier=assignment.verifier,
                                    edge=assignment.edge or "")
            reply = await self.nc.request(subjects.verifier_prefill(assignment.verifier), protocol.encode(prefill),
                                          timeout=self.request_timeout_s)
            error = protocol.decode(reply.data, PrefillReply).error
        except Exception as exc:
            error = f"prefill failed: {exc!r}"
        if error:
            self.policy.finish(sid)
            with contextlib.suppress(Exception):
                await self.store.end(sid)
            await msg.respond(protocol.encode(SessionOpened(session_id=sid, error=error)))
            return
        self._outputs[sid] = _Output(request.max_new_tokens, set(request.eos_ids))
        self.policy.draft_due(sid, time.monotonic())
        if assignment.edge is not None:
            await self.nc.publish(subjects.edge_assign(assignment.edge), protocol.encode(
                DraftAssign(session_id=sid, tokens=request.tokens, scheduler=self.instance_id,
                            **{**self.draft_shape, "budget": self.policy.shape_for(sid)[0]})))
        await msg.respond(protocol.encode(SessionOpened(session_id=sid, verifier=assignment.verifier,
                                                        edge=assignment.edge)))
        self._wake.set()

    async def on_close(self, msg: Msg) -> None:
        if (close := self.reject.decode(msg.data, CloseSession, "a close request")) is None:
            return
        await self._end(close.session_id)

    async def _end(self, session_id: str) -> None:
        state = self.policy.sessions.get(session_id)
        self._outputs.pop(session_id, None)
        self.policy.finish(session_id)
        if state is None:
            return
        try:
            await self.store.end(session_id)
        except Exception as exc:  # the keys expire on their own
            log.warning("could not delete session %s from Redis: %r", session_id[:16], exc)
        close = protocol.encode(CloseSession(session_id=session_id))
        await self.nc.publish(subjects.verifier_close(state.verifier), close)
        if state.edge is not None:
            await self.nc.publish(subjects.edge_close(state.edge), close)

    # -- drafts and batches -----------------------------------------------------------

    async def _fail(self, session_id: str, error: str) -> None:
        """End a session that cannot go on, telling its caller why."""
        output = self._outputs.get(session_id)
        if output is not None:
            log.error("session %s ends: %s", session_id[:16], error)
            event = TokenEvent(session_id=session_id, index=output.generated, tokens=[], finished=True,
                               finish_reason="error", error=error)
            await self.nc.publish(subjects.session_tokens(session_id), protocol.encode(event))
        await self._end(session_id)

    async def on_draft(self, msg: Msg) -> None:
        edge = msg.subject.split(".")[-2]
        if (tree := self.reject.decode(msg.data, DraftTreeMsg, f"a draft from {edge}")) is None:
            return
        state, now = self.policy.sessions.get(tree.session_id), time.monotonic()
        waiting_since = state.waiting_since if state is not None else None
        if (reason := self.policy.draft_arrived(tree, edge, now, tree.draft_ms / 1000)) is not None:
            self.reject(reason, f"a draft from {edge}")
            return
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
        for edge, sessions in self.policy.expire_edges(now).items():
            self._fall_back(edge, sessions)
        for verifier, lost in self.policy.expire_verifiers(now).items():
            await self._verifier_gone(verifier, lost)
        for edge, sessions in self.policy.expire_drafts(now).items():
            self.metrics.fallbacks.labels("draft_deadline").inc(len(sessions))
            log.warning("edge %s missed the draft deadline for %d session(s); they continue with server steps",
                        edge, len(sessions))
            for sid in sessions:
                await self.nc.publish(subjects.edge_close(edge), protocol.encode(CloseSession(session_id=sid)))

    async def _verify(self, verifier: str, batch: list[DraftTreeMsg]) -> None:
        request = VerifyBatchRequest(batch_id=uuid.uuid4().hex[:12], trees=batch)
        try:
            data = await self.nc.request(subjects.verifier_verify(verifier), protocol.encode(request),
                                         timeout=self.request_timeout_s)
            reply = protocol.decode(data.data, VerifyBatchReply)
        except Exception as exc:
            log.warning("batch for verifier %s failed (%r); its trees wait for a verifier", verifier, exc)
            self.policy.requeue(batch)
            await asyncio.sleep(0.5)  # a dead verifier answers at once: do not spin until it expires
            return
        finally:
            self._busy.discard(verifier)
            self._wake.set()
        if reply.forward_ms > 0 and reply.results:
            self.policy.verify_timed(verifier, sum(len(t.tokens) + 1 for t in batch), reply.forward_ms / 1000)
        by_session = {t.session_id: t for t in batch}
        self._count_speculation(reply.results, by_session)
        for rejection in reply.rejected:
            self.reject(rejection.reason, f"a tree verified by {verifier}")
            tree = by_session.get(rejection.session_id)
            if tree is None:
                continue
            if rejection.reason == "stale_cycle" and await self._catch_up(tree):
                continue
            if not self.policy.refused(tree):
                await self._fail(tree.session_id, f"the verifier keeps refusing its trees ({rejection.reason})")
        for result in reply.results:
            tree = by_session.get(result.session_id)
            await self._deliver(result, len(tree.tokens) if tree is not None else 0)

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
        record = await self.store.load(tree.session_id)
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
        self.policy.verified(sid, len(new), time.monotonic())
        keep, reason = [], None
        for token in new:
            keep.append(token)
            if token in output.eos_ids:
                reason = "stop"
                break
            if output.generated + len(keep) >= output.max_new_tokens:
                reason = "length"
                break
        event = TokenEvent(session_id=sid, index=output.generated, tokens=keep, finished=reason is not None,
                           finish_reason=reason, drafted=drafted, accepted=len(result.accepted))
        output.generated += len(keep)
        await self.nc.publish(subjects.session_tokens(sid), protocol.encode(event))
        if reason is not None:
            await self._end(sid)
        elif state.edge is not None:
            budget, depth = self.policy.shape_for(sid)
            result = msgspec.structs.replace(result, next_budget=budget, next_depth=depth)
            await self.nc.publish(subjects.edge_result(state.edge), protocol.encode(result))
