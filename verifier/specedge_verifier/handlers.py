"""The verifier's face on the bus: prefill, verify and close requests for its sessions.

Owns decoding and checking what arrives (a malformed message or tree is refused with a
short reason, logged without contents and counted; it never crashes the service), and
running the target model off the event loop, one pass at a time. The target-side
engine is `specedge.engine.parties.Verifier`; batching is the scheduler's.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from specedge import protocol, subjects
from specedge.engine.parties import Verifier
from specedge.engine.runner import CacheFullError
from specedge.engine.sampling import SamplingParams
from specedge.protocol import (
    CloseSession,
    PrefillReply,
    PrefillRequest,
    ProtocolError,
    Rejection,
    Rejections,
    VerifyBatchReply,
    VerifyBatchRequest,
)

log = logging.getLogger("specedge_verifier")


class VerifierService:
    """Handlers for one verifier instance; `rejected` counts refusals by reason."""

    def __init__(self, nc: Client, instance_id: str, verifier: Verifier) -> None:
        self.nc, self.instance_id, self.verifier = nc, instance_id, verifier
        self.reject = Rejections(log)
        self._model_lock = asyncio.Lock()  # one forward pass at a time

    async def subscribe(self) -> None:
        await self.nc.subscribe(subjects.verifier_prefill(self.instance_id), cb=self.on_prefill)
        await self.nc.subscribe(subjects.verifier_verify(self.instance_id), cb=self.on_verify)
        await self.nc.subscribe(subjects.verifier_close(self.instance_id), cb=self.on_close)
        await self.nc.flush()

    async def _reply(self, msg: Msg, message: protocol.Message) -> None:
        if msg.reply:
            await msg.respond(protocol.encode(message))

    async def on_prefill(self, msg: Msg) -> None:
        try:
            request = protocol.decode(msg.data, PrefillRequest)
        except ProtocolError as exc:
            self.reject(exc.reason, "a prefill request")
            await self._reply(msg, PrefillReply(session_id="", error=exc.reason))
            return
        if not request.tokens or any(not 0 <= t < self.verifier.vocab_size for t in request.tokens):
            self.reject("bad_prompt", "a prefill request")
            await self._reply(msg, PrefillReply(session_id=request.session_id, error="bad_prompt"))
            return
        s = request.sampling
        try:
            params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)
        except ValueError:
            self.reject("bad_sampling", "a prefill request")
            await self._reply(msg, PrefillReply(session_id=request.session_id, error="bad_sampling"))
            return
        async with self._model_lock:
            self.verifier.close(request.session_id)  # a re-prefill replaces the old cache
            try:
                await asyncio.to_thread(self.verifier.open, request.session_id, request.tokens, params)
            except CacheFullError:
                self.verifier.close(request.session_id)
                await self._reply(msg, PrefillReply(session_id=request.session_id, error="no_capacity"))
                return
        await self._reply(msg, PrefillReply(session_id=request.session_id, committed_len=len(request.tokens)))

    async def on_verify(self, msg: Msg) -> None:
        try:
            request = protocol.decode(msg.data, VerifyBatchRequest)
        except ProtocolError as exc:
            self.reject(exc.reason, "a verify request")
            rejection = Rejection(session_id="", reason=exc.reason)
            await self._reply(msg, VerifyBatchReply(batch_id="", rejected=[rejection]))
            return
        async with self._model_lock:
            good, rejected, seen = [], [], set()
            for tree in request.trees:
                reason = "duplicate_session" if tree.session_id in seen else self.verifier.problem(tree)
                seen.add(tree.session_id)
                if reason is None:
                    good.append(tree)
                else:
                    self.reject(reason, f"a tree for session {tree.session_id[:16]}")
                    rejected.append(Rejection(session_id=tree.session_id, reason=reason))
            started = time.perf_counter()
            results = await asyncio.to_thread(self.verifier.verify, good) if good else []
            forward_ms = 1000 * (time.perf_counter() - started)
            results = [msgspec.structs.replace(r, verify_ms=forward_ms) for r in results]
        await self._reply(msg, VerifyBatchReply(batch_id=request.batch_id, results=results, rejected=rejected,
                                                forward_ms=forward_ms))

    async def on_close(self, msg: Msg) -> None:
        if (request := self.reject.decode(msg.data, CloseSession, "a close request")) is None:
            return
        async with self._model_lock:
            self.verifier.close(request.session_id)
