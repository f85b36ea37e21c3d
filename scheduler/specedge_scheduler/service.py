"""The scheduler on the bus: opens sessions, collects drafts, dispatches verification batches.

Owns the wiring of `SchedulingPolicy` to NATS: registry traffic tells it which verifiers
and edges exist (and their capacity); `sessions.open` requests are assigned, prefilled on
their verifier and handed to an edge; drafts arriving on `drafts.<edge>` are checked and
queued; whenever a verifier is free, its next batch goes out in one request; each result
goes back to the session's edge and, as a `TokenEvent`, to whoever opened the session.
Edges that stop heartbeating are dropped and their sessions continue server-side
(autoregressive steps) without losing or repeating a token. Decisions live in the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg

from specedge import protocol, registry, subjects
from specedge.protocol import (
    CloseSession,
    DraftAssign,
    DraftTreeMsg,
    PrefillReply,
    PrefillRequest,
    ProtocolError,
    Rejections,
    ServiceAnnouncement,
    ServiceLeave,
    SessionOpen,
    SessionOpened,
    TokenEvent,
    VerifyBatchReply,
    VerifyBatchRequest,
)
from specedge_scheduler.policy import NoCapacityError, SchedulingPolicy

log = logging.getLogger("specedge_scheduler")


@dataclass
class _Output:
    max_new_tokens: int
    eos_ids: set[int]
    generated: int = 0


class SchedulerService:
    def __init__(self, nc: Client, policy: SchedulingPolicy, draft_shape: dict[str, int],
                 request_timeout_s: float = 30.0) -> None:
        self.nc, self.policy, self.draft_shape = nc, policy, draft_shape
        self.request_timeout_s = request_timeout_s
        self.reject = Rejections(log)
        self._outputs: dict[str, _Output] = {}
        self._busy: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def subscribe(self) -> None:
        await self.nc.subscribe(subjects.REGISTRY_ANNOUNCE_ALL, cb=self.on_announce)
        await self.nc.subscribe(subjects.REGISTRY_LEAVE_ALL, cb=self.on_leave)
        await self.nc.subscribe(subjects.SESSIONS_OPEN, queue="schedulers", cb=self.on_open)
        await self.nc.subscribe(subjects.SESSIONS_CLOSE, cb=self.on_close)
        await self.nc.subscribe(subjects.DRAFTS_ALL, cb=self.on_draft)
        await self.nc.flush()

    # -- membership ---------------------------------------------------------------------

    async def on_announce(self, msg: Msg) -> None:
        try:
            self._seen(protocol.decode(msg.data, ServiceAnnouncement))
        except (ProtocolError, ValueError):
            self.reject("bad_announcement", "an announcement")

    async def refresh(self) -> None:
        """Ask the bus who is there now (at start, and when no verifier is known)."""
        for ann in await registry.discover(self.nc, wait_s=0.3):
            with contextlib.suppress(ValueError):
                self._seen(ann)

    def _seen(self, ann: ServiceAnnouncement) -> None:
        capacity = int(ann.details.get("max_sessions", "0"))
        fingerprint = ann.details.get("tokenizer_fingerprint", "")
        now = time.monotonic()
        if ann.role == "verifier":
            self.policy.verifier_seen(ann.instance_id, capacity, now, fingerprint)
        elif ann.role == "edge-agent":
            new = ann.instance_id not in self.policy.edges
            if not self.policy.edge_seen(ann.instance_id, capacity, now, fingerprint) and new:
                log.warning("edge %s (%s) refused: its draft model's tokenizer (%s) differs from every "
                            "verifier's target tokenizer; it will get no sessions",
                            ann.name, ann.details.get("model", "?"), fingerprint)
        self._wake.set()

    async def on_leave(self, msg: Msg) -> None:
        try:
            leave = protocol.decode(msg.data, ServiceLeave)
        except ProtocolError:
            self.reject("bad_leave", "a leave message")
            return
        if leave.role == "edge-agent":
            self._fall_back(leave.instance_id, self.policy.edge_gone(leave.instance_id))

    def _fall_back(self, edge: str, sessions: list[str]) -> None:
        if sessions:
            log.warning("edge %s is gone; %d session(s) continue with server-side drafting", edge, len(sessions))
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
                assignment = self.policy.assign(sid, len(request.tokens), use_edge=request.use_edge)
            except NoCapacityError:
                await self.refresh()  # a verifier may have started since our last heartbeat from it
                assignment = self.policy.assign(sid, len(request.tokens), use_edge=request.use_edge)
        except (ValueError, NoCapacityError) as exc:
            await msg.respond(protocol.encode(SessionOpened(session_id=sid, error=str(exc))))
            return
        prefill = PrefillRequest(session_id=sid, tokens=request.tokens, sampling=request.sampling)
        try:
            reply = await self.nc.request(subjects.verifier_prefill(assignment.verifier), protocol.encode(prefill),
                                          timeout=self.request_timeout_s)
            error = protocol.decode(reply.data, PrefillReply).error
        except Exception as exc:
            error = f"prefill failed: {exc!r}"
        if error:
            self.policy.finish(sid)
            await msg.respond(protocol.encode(SessionOpened(session_id=sid, error=error)))
            return
        self._outputs[sid] = _Output(request.max_new_tokens, set(request.eos_ids))
        if assignment.edge is not None:
            await self.nc.publish(subjects.edge_assign(assignment.edge), protocol.encode(
                DraftAssign(session_id=sid, tokens=request.tokens, **self.draft_shape)))
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
        close = protocol.encode(CloseSession(session_id=session_id))
        await self.nc.publish(subjects.verifier_close(state.verifier), close)
        if state.edge is not None:
            await self.nc.publish(subjects.edge_close(state.edge), close)

    # -- drafts and batches -----------------------------------------------------------

    async def on_draft(self, msg: Msg) -> None:
        edge = msg.subject.rsplit(".", 1)[-1]
        if (tree := self.reject.decode(msg.data, DraftTreeMsg, f"a draft from {edge}")) is None:
            return
        if (reason := self.policy.draft_arrived(tree, edge)) is not None:
            self.reject(reason, f"a draft from {edge}")
            return
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """The dispatch loop: expire silent edges, queue server-side steps, send batches."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            self._wake.clear()
            for edge, sessions in self.policy.expire_edges(time.monotonic()).items():
                self._fall_back(edge, sessions)
            self.policy.server_side_trees()
            for verifier in list(self.policy.verifiers):
                if verifier in self._busy:
                    continue
                batch = self.policy.next_batch(verifier)
                if batch:
                    self._busy.add(verifier)
                    task = asyncio.create_task(self._verify(verifier, batch))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _verify(self, verifier: str, batch: list[DraftTreeMsg]) -> None:
        request = VerifyBatchRequest(batch_id=uuid.uuid4().hex[:12], trees=batch)
        try:
            data = await self.nc.request(subjects.verifier_verify(verifier), protocol.encode(request),
                                         timeout=self.request_timeout_s)
            reply = protocol.decode(data.data, VerifyBatchReply)
        except Exception as exc:
            log.warning("batch for verifier %s failed (%r); its sessions will draft again", verifier, exc)
            self.policy.requeue(batch)
            return
        finally:
            self._busy.discard(verifier)
            self._wake.set()
        for rejection in reply.rejected:
            self.reject(rejection.reason, f"a tree verified by {verifier}")
        self.policy.requeue([t for t in batch if t.session_id in {r.session_id for r in reply.rejected}])
        for result in reply.results:
            await self._deliver(result)

    async def _deliver(self, result: protocol.VerifyResult) -> None:
        sid = result.session_id
        output, state = self._outputs.get(sid), self.policy.sessions.get(sid)
        if output is None or state is None:
            return  # closed meanwhile
        new = [*result.accepted, result.bonus]
        self.policy.verified(sid, len(new))
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
                           finish_reason=reason)
        output.generated += len(keep)
        await self.nc.publish(subjects.session_tokens(sid), protocol.encode(event))
        if reason is not None:
            await self._end(sid)
        elif state.edge is not None:
            await self.nc.publish(subjects.edge_result(state.edge), protocol.encode(result))
