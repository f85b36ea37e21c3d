"""The scheduler on the bus: turns messages into events for `core.SchedulerCore` and carries
out the commands it returns.

It decides nothing. Registry traffic (`registry.announce.*`, `registry.leave.*`),
`sessions.open` (queue group `schedulers`: each request goes to one scheduler, which then
owns the session), `sessions.close`, each edge's drafts to us (`drafts.<edge>.<us>`, one
subscription per edge, made and dropped on the core's `Listen`/`StopListening`) and
stats requests go to the core as they arrive; so do the outcomes of the commands that
wait for one (a verification, a prefill, a Redis read). Commands are carried out in
order: publishing (with the session's trace context), Redis writes and reads, requests to
verifiers (each batch in a task of its own), the orphan scan, and the session's spans
(`tracing`). A `Tick` goes to the core whenever an event may have made a batch ready, and
at the latest at the core's `wake_at`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from specedge import bus, protocol, registry, subjects, telemetry
from specedge.metrics import SchedulerMetrics
from specedge.protocol import PrefillReply, PrefillRequest, SessionOpened, VerifyBatchReply, VerifyBatchRequest
from specedge.state import SessionStore
from specedge_scheduler import core, events
from specedge_scheduler.core import SchedulerCore
from specedge_scheduler.events import BatchVerified, Command, Event
from specedge_scheduler.guard import EdgeGuard
from specedge_scheduler.policy import SchedulingPolicy
from specedge_scheduler.tracing import SessionSpans, batch_span

log = logging.getLogger("specedge_scheduler")


class SchedulerService:
    def __init__(self, nc: Client, instance_id: str, store: SessionStore, policy: SchedulingPolicy,
                 draft_shape: dict[str, int], request_timeout_s: float = 30.0,
                 metrics: SchedulerMetrics | None = None, heartbeat_s: float = 2.0,
                 guard: EdgeGuard | None = None) -> None:
        self.nc, self.instance_id, self.store = nc, instance_id, store
        self.request_timeout_s = request_timeout_s
        self.core = SchedulerCore(instance_id, policy, draft_shape, guard=guard, metrics=metrics,
                                  request_timeout_s=request_timeout_s, heartbeat_s=heartbeat_s, now=time.monotonic())
        self.spans: dict[str, SessionSpans] = {}
        self._draft_subs: dict[str, Subscription] = {}  # per edge: its drafts to us
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def policy(self) -> SchedulingPolicy:
        return self.core.policy

    @property
    def metrics(self) -> SchedulerMetrics:
        return self.core.metrics

    async def subscribe(self) -> None:
        nc = self.nc
        await bus.subscribe(nc, subjects.REGISTRY_ANNOUNCE_ALL,
                            cb=lambda msg: self.feed(events.Announced(msg.subject, msg.data)))
        await bus.subscribe(nc, subjects.REGISTRY_LEAVE_ALL, cb=lambda msg: self.feed(events.Left(msg.data)))
        await bus.subscribe(nc, subjects.SESSIONS_OPEN, queue="schedulers", cb=self.on_open)
        await bus.subscribe(nc, subjects.SESSIONS_CLOSE, cb=lambda msg: self.feed(events.CloseRequested(msg.data)))
        await bus.subscribe(nc, subjects.stats("scheduler", self.instance_id),
                            cb=lambda msg: self.feed(events.StatsRequested(msg.reply)))
        await nc.flush()

    async def refresh(self) -> None:
        """Ask the bus who is there now (at start, and when no verifier has room): every
        service announces itself on its own subject, which its credentials bind to its role
        and id (`registry.discover` believes nothing else)."""
        for ann in await registry.discover(self.nc, wait_s=0.3):
            await self.feed(events.Discovered(ann))

    async def on_open(self, msg: Msg) -> None:
        event = events.OpenRequested(msg.data, msg.reply, otel_context.get_current())  # the opener's span
        if not telemetry.enabled():
            await self.feed(event)
            return
        with telemetry.tracer.start_as_current_span("open session", kind=SpanKind.SERVER):
            await self.feed(event)

    async def feed(self, event: Event) -> None:
        """Hand an event to the core and carry out what it answers."""
        commands = self.core.handle(event, time.monotonic())
        if not isinstance(event, events.Tick):
            self._wake.set()
        for command in commands:
            try:
                await self.execute(command)
            except Exception as exc:  # one failed publish must not lose the commands after it
                log.warning("could not carry out %s: %r", type(command).__name__, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """The dispatch loop: a `Tick` whenever something happened, or at the core's `wake_at`."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.001, self.core.wake_at - time.monotonic()))
            self._wake.clear()
            await self.feed(events.Tick())

    # -- carrying out commands ------------------------------------------------------------

    async def execute(self, command: Command) -> None:
        match command:
            case events.Publish():
                await self._publish(command)
            case events.Verify():
                self._spawn(self._verify(command))
            case events.CreateSession():
                await self.feed(events.Prefilled(command.request.session_id, await self._create(command)))
            case events.EndSession():
                try:
                    await self.store.end(command.session_id)
                except Exception as exc:  # the keys expire on their own
                    log.warning("could not delete session %s from Redis: %r", command.session_id[:16], exc)
            case events.RecordAssignment():
                owners = {"edge": command.edge} | ({"verifier": command.verifier} if command.verifier else {})
                try:
                    await self.store.assign(command.session_id, **owners)
                    ok = True
                except Exception as exc:
                    log.warning("could not record session %s's owners in Redis: %r", command.session_id[:16], exc)
                    ok = False
                if command.confirm:
                    await self.feed(events.Recorded(command.session_id, ok))
            case events.LoadRecord():
                try:
                    record = await self.store.load(command.session_id)
                except Exception as exc:
                    log.warning("cannot read session %s from Redis: %r", command.session_id[:16], exc)
                    record = None
                await self.feed(events.RecordLoaded(command.session_id, command.purpose, record, command.tree,
                                                  command.move))
            case events.Listen():
                await self._listen(command)
            case events.StopListening():
                if (sub := self._draft_subs.pop(command.edge, None)) is not None:
                    # (in a task of its own: this may run inside that subscription's callback)
                    self._spawn(self._unsubscribe(sub))
            case events.SuspendEdge():
                try:
                    await self.store.suspend_edge(command.edge, command.seconds)
                except Exception as exc:
                    log.warning("cannot record edge %s's suspension in Redis: %r", command.edge, exc)
            case events.Rediscover():
                await self.refresh()
                await self.feed(command.then)
            case events.ScanOrphans():
                self._spawn(self._scan(command))
            case _:
                self._trace(command)

    async def _publish(self, command: events.Publish) -> None:
        if not command.subject:
            return  # a request sent without a reply subject
        if isinstance(command.message, SessionOpened) and command.message.error and telemetry.enabled():
            trace.get_current_span().set_status(Status(StatusCode.ERROR, command.message.error))
        spans = self.spans.get(command.session_id)
        context = None
        if spans is not None and command.trace is not None:
            context = {"session": spans.session_context, "cycle": spans.context,
                       "delivery": spans.delivery_context}[command.trace]
        await bus.publish(self.nc, command.subject, protocol.encode(command.message), context=context)

    async def _create(self, command: events.CreateSession) -> str | None:
        """Record a new session in Redis and prefill it on its verifier; the error, if any."""
        request = command.request
        if telemetry.enabled():
            trace.get_current_span().set_attributes({
                "specedge.session.id": request.session_id, "specedge.mode": request.mode,
                "specedge.prompt_tokens": len(request.tokens)})
        prefill = PrefillRequest(session_id=request.session_id, tokens=request.tokens, sampling=request.sampling)
        try:
            await self.store.create(request.session_id, request.tokens, request.sampling, user=request.user,
                                    mode=request.mode, scheduler=self.instance_id, verifier=command.verifier,
                                    edge=command.edge, max_new_tokens=request.max_new_tokens,
                                    eos_ids=request.eos_ids)
            reply = await bus.request(self.nc, subjects.verifier_prefill(command.verifier),
                                      protocol.encode(prefill), timeout=self.request_timeout_s)
            return protocol.decode(reply.data, PrefillReply).error or None
        except Exception as exc:
            return f"prefill failed: {exc!r}"

    async def _verify(self, command: events.Verify) -> None:
        verifier, trees = command.verifier, command.trees
        request = VerifyBatchRequest(batch_id=uuid.uuid4().hex[:12], trees=list(trees))
        span = batch_span(request.batch_id, verifier, trees, [self.spans.get(t.session_id) for t in trees])
        try:
            data = await bus.request(self.nc, subjects.verifier_verify(verifier), protocol.encode(request),
                                     timeout=self.request_timeout_s, context=telemetry.context_of(span))
            reply = protocol.decode(data.data, VerifyBatchReply)
        except Exception as exc:
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
                span.end()
            await self.feed(BatchVerified(verifier, trees, None, repr(exc)))
            return
        if span is not None:
            span.set_attributes({"specedge.verify.forward_ms": reply.forward_ms,
                                 "specedge.verify.accepted_tokens": sum(len(r.accepted) for r in reply.results),
                                 "specedge.verify.rejected": len(reply.rejected)})
            span.end()
        await self.feed(BatchVerified(verifier, trees, reply))

    async def _listen(self, command: events.Listen) -> None:
        """Subscribe to a newly seen edge's drafts to us, unless Redis says it is cut off."""
        edge = command.edge
        left = 0.0
        if edge not in self._draft_subs:
            try:
                left = await self.store.edge_suspension(edge)
            except Exception as exc:  # Redis unreachable: our own record decides
                log.warning("cannot read edge %s's suspension from Redis: %r", edge, exc)
            if left <= 0 and edge not in self._draft_subs:  # (another announcement may have subscribed meanwhile)
                self._draft_subs[edge] = await bus.subscribe(
                    self.nc, subjects.drafts(edge, self.instance_id),
                    cb=lambda msg: self.feed(events.DraftReceived(msg.subject, msg.data)))
        await self.feed(events.Listening(edge, command.announcement, left))

    async def _scan(self, command: events.ScanOrphans) -> None:
        """Claim each orphaned session in Redis (`core.orphaned`) and hand it to the core."""
        claimed = dict(command.claimed)
        try:
            for sid in await self.store.session_ids():
                if sid in command.known:
                    continue
                record = await self.store.load(sid)
                if record is None:
                    await self.feed(events.OrphanGone(sid))
                    continue
                if (dead := claimed.get(sid)) is None:  # (else claimed at an earlier scan, not adopted)
                    if not core.orphaned(record, command.live, command.timeout_s):
                        continue
                    if not await self.store.claim(sid, record.scheduler, self.instance_id):
                        continue  # another scheduler was quicker
                    dead = record.scheduler
                await self.feed(events.OrphanClaimed(record, dead))
        except Exception as exc:  # Redis down: try again at the next scan
            log.warning("could not look for orphaned sessions: %r", exc)
        finally:
            await self.feed(events.ScanDone())

    def _trace(self, command: Command) -> None:
        match command:
            case events.TraceSession():
                self.spans[command.session_id] = SessionSpans(command.session_id, command.parent,
                                                              command.adopted_from)
                return
            case events.TraceEnd():
                if (spans := self.spans.pop(command.session_id, None)) is not None:
                    spans.close(command.error)
                return
        if (spans := self.spans.get(command.session_id)) is None:
            return
        match command:
            case events.TraceCycle():
                spans.begin_cycle(command.cycle)
            case events.TraceDraft():
                spans.draft_arrived(command.cycle)
            case events.TraceDelivery():
                spans.start_delivery(command.accepted, command.committed, command.finish_reason)
            case events.TraceDelivered():
                spans.end_delivery()
            case _:
                raise TypeError(f"not a scheduler command: {command!r}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _unsubscribe(sub: Subscription) -> None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
