"""The edge agent's face on the bus: draft for assigned sessions, proactively.

Owns, per session: prefill on assignment, publishing each draft tree on the edge's own
drafts subject, and — while a tree is out for verification — proactive drafting one
draft pass at a time off the event loop, so a result is picked up within one pass.
On a result it applies it (reusing the proactive tree on a hit) and publishes the next
tree to the scheduler that owns the session. Malformed or stale messages are refused with
a reason and counted, never fatal. If the server side refuses this edge altogether (its
draft tokenizer differs from the target's), it says why and the agent stops.
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

from specedge import protocol, subjects
from specedge.engine.parties import Drafter, StaleMessageError
from specedge.engine.runner import CacheFullError
from specedge.engine.tree import TreeParams
from specedge.protocol import CloseSession, DraftAssign, EdgeRefused, ProtocolError, Rejections, VerifyResult

log = logging.getLogger("edge_agent")


class EdgeService:
    def __init__(self, nc: Client, instance_id: str, drafter: Drafter, stop: asyncio.Event | None = None) -> None:
        self.nc, self.instance_id, self.drafter = nc, instance_id, drafter
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

    async def subscribe(self) -> None:
        await self.nc.subscribe(subjects.edge_assign(self.instance_id), cb=self.on_assign)
        await self.nc.subscribe(subjects.edge_result(self.instance_id), cb=self.on_result)
        await self.nc.subscribe(subjects.edge_close(self.instance_id), cb=self.on_close)
        await self.nc.subscribe(subjects.edge_refused(self.instance_id), cb=self.on_refused)
        await self.nc.flush()

    async def on_refused(self, msg: Msg) -> None:
        if (refused := self.reject.decode(msg.data, EdgeRefused, "a refusal")) is None:
            return
        log.error("the server side refuses this edge (%s): %s", refused.reason, refused.message)
        self.refused = refused
        self.stop.set()

    async def on_assign(self, msg: Msg) -> None:
        try:
            assign = protocol.decode(msg.data, DraftAssign)
            params = TreeParams(assign.budget, assign.depth, assign.branch, assign.beams)
            subjects.drafts(self.instance_id, assign.scheduler)  # a usable subject token
        except (ProtocolError, ValueError) as exc:
            self.reject(getattr(exc, "reason", "bad_params"), "an assignment")
            return
        async with self._lock:
            self.drafter.close(assign.session_id)
            try:
                await asyncio.to_thread(self.drafter.open, assign.session_id, assign.tokens, params)
            except (CacheFullError, ValueError) as exc:
                self.drafter.close(assign.session_id)
                self.reject("cannot_open", f"session {assign.session_id[:16]} ({exc})")
                return
        self._scheduler[assign.session_id] = assign.scheduler
        await self._send_next(assign.session_id)

    async def on_result(self, msg: Msg) -> None:
        if (result := self.reject.decode(msg.data, VerifyResult, "a result")) is None:
            return
        if result.session_id not in self.drafter.sessions:
            self.reject("unknown_session", "a result")
            return
        sent = self._sent_at.pop(result.session_id, None)
        if sent is not None:
            self.round_trips.append((1000 * (time.monotonic() - sent), result.verify_ms))
        self._stop_proactive(result.session_id)
        async with self._lock:
            try:
                await asyncio.to_thread(self.drafter.on_result, result)
            except (StaleMessageError, ValueError) as exc:
                self.reject("stale_or_bad_result", f"a result for {result.session_id[:16]} ({exc})")
                return
            if result.next_budget > 0 and result.next_depth > 0:
                self.drafter.reshape(result.session_id, result.next_budget, result.next_depth)
        await self._send_next(result.session_id)

    async def on_close(self, msg: Msg) -> None:
        if (close := self.reject.decode(msg.data, CloseSession, "a close request")) is None:
            return
        self._stop_proactive(close.session_id)
        self._scheduler.pop(close.session_id, None)
        self._sent_at.pop(close.session_id, None)
        async with self._lock:
            self.drafter.close(close.session_id)

    async def _send_next(self, session_id: str) -> None:
        async with self._lock:
            if session_id not in self.drafter.sessions:
                return
            started = time.perf_counter()
            tree = await asyncio.to_thread(self.drafter.draft, session_id)
            tree = msgspec.structs.replace(tree, draft_ms=1000 * (time.perf_counter() - started))
            self.drafter.start_proactive(session_id)
        self._sent_at[session_id] = time.monotonic()
        await self.nc.publish(subjects.drafts(self.instance_id, self._scheduler[session_id]), protocol.encode(tree))
        self._drafting_ahead.add(session_id)
        task = asyncio.create_task(self._draft_ahead(session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _draft_ahead(self, session_id: str) -> None:
        """Proactive drafting, one pass at a time, until done or told to stop.

        Stopping is a flag checked between passes, never a cancellation: a pass already
        running in its thread finishes before anything else touches the draft model.
        """
        while session_id in self._drafting_ahead:
            async with self._lock:
                if session_id not in self._drafting_ahead or session_id not in self.drafter.sessions:
                    return
                more = await asyncio.to_thread(self.drafter.proactive_step, session_id)
            if not more:
                return
            await asyncio.sleep(0)  # let a waiting result take the lock

    def _stop_proactive(self, session_id: str) -> None:
        self._drafting_ahead.discard(session_id)
