"""The verifier's face on the bus: prefill, verify and close requests for its sessions.

Owns decoding and checking what arrives (a malformed message or tree is refused with a
short reason, logged without contents and counted; it never crashes the service),
running the target model off the event loop, one pass at a time, and the session's
durable side: each verified cycle is committed to Redis exactly once before its result
is published; a tree for a session this verifier does not hold (its cache was evicted,
or the session moved here from a verifier that died) is re-prefilled from the committed
tokens in Redis; a replay of the cycle just verified gets the same result again. The
target-side engine is `specedge.engine.parties.Verifier`; batching is the scheduler's.
While tracing is on, a prefill is a `prefill` span and a batch a `verify batch` span
with its model pass as a `forward pass` child, under the scheduler's span (the request
headers carry its context).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from specedge import bus, protocol, subjects, telemetry
from specedge.engine.grammar import GrammarError
from specedge.engine.parties import Verifier
from specedge.engine.runner import CacheFullError, SessionTooLongError
from specedge.engine.sampling import SamplingSpec
from specedge.metrics import VerifierMetrics
from specedge.protocol import (
    CloseSession,
    PrefillReply,
    PrefillRequest,
    ProtocolError,
    Reason,
    Rejection,
    Rejections,
    ServiceStats,
    StatsRequest,
    VerifyBatchReply,
    VerifyBatchRequest,
    VerifyResult,
    spans_since,
)
from specedge.state import Commit, SessionStore

log = logging.getLogger("specedge_verifier")


class VerifierService:
    """Handlers for one verifier instance; `rejected` counts refusals by reason."""

    def __init__(self, nc: Client, instance_id: str, verifier: Verifier, store: SessionStore,
                 metrics: VerifierMetrics | None = None) -> None:
        self.nc, self.instance_id, self.verifier, self.store = nc, instance_id, verifier, store
        self.metrics = metrics or VerifierMetrics()
        self.reject = Rejections(log, lambda reason: self.metrics.rejected.labels(reason).inc())
        self.metrics.busy_fraction.set_function(self._busy_fraction)
        self._model_lock = asyncio.Lock()  # one forward pass at a time
        self._last: dict[str, VerifyResult] = {}  # each session's latest result, for replays
        self._used: dict[str, float] = {}  # session -> when it was last prefilled or verified
        self.reprefills = self.evictions = 0
        self.spans: deque[list[float]] = deque(maxlen=5000)  # recent verification passes, for timelines

    async def subscribe(self) -> None:
        nc = self.nc
        await bus.subscribe(nc, subjects.verifier_prefill(self.instance_id), cb=self.on_prefill)
        await bus.subscribe(nc, subjects.verifier_verify(self.instance_id), cb=self.on_verify)
        await bus.subscribe(nc, subjects.verifier_close(self.instance_id), cb=self.on_close)
        await bus.subscribe(nc, subjects.stats("verifier", self.instance_id), cb=self.on_stats)
        await self.nc.flush()

    def _busy_fraction(self, window_s: float = 60.0) -> float:
        """Share of the last `window_s` seconds spent in verification passes."""
        start = time.monotonic() - window_s
        return sum(end - max(begin, start) for begin, end in self.spans if end > start) / window_s

    async def on_stats(self, msg: Msg) -> None:
        request = StatsRequest() if not msg.data else self.reject.decode(msg.data, StatsRequest, "a stats request")
        if request is None:
            return
        counters = {"busy_s": self.verifier.busy_s, "forward_passes": self.verifier.forward_passes,
                    "sessions": len(self.verifier.sessions), "reprefills": self.reprefills,
                    "evictions": self.evictions, "rejected": sum(self.reject.counts.values())}
        now = time.monotonic()
        await self._reply(msg, ServiceStats(instance_id=self.instance_id, counters=counters,
                                            spans=spans_since(self.spans, request.cutoff(now)), now=now))

    async def _reply(self, msg: Msg, message: protocol.Message) -> None:
        if msg.reply:
            await msg.respond(protocol.encode(message))

    async def on_prefill(self, msg: Msg) -> None:
        try:
            request = protocol.decode(msg.data, PrefillRequest, protocol.MAX_SESSION_MESSAGE_BYTES)
        except ProtocolError as exc:
            self.reject(exc.reason, "a prefill request")
            await self._reply(msg, PrefillReply(session_id="", error=exc.reason))
            return
        if not request.tokens or any(not 0 <= t < self.verifier.vocab_size for t in request.tokens):
            self.reject(Reason.BAD_PROMPT, "a prefill request")
            await self._reply(msg, PrefillReply(session_id=request.session_id, error=Reason.BAD_PROMPT))
            return
        params = request.sampling  # (checked when decoded)
        with telemetry.span("prefill", SpanKind.SERVER, {"specedge.session.id": request.session_id,
                                                         "specedge.prompt_tokens": len(request.tokens)}) as span:
            async with self._model_lock:
                error = await self._open(request.session_id, request.tokens, params, cycle=0, prefill=False)
            if error is None:
                error = await self._prefill(request.session_id)
            if span is not None and error:
                span.set_attribute("specedge.error", error)
        await self._reply(msg, PrefillReply(session_id=request.session_id, committed_len=len(request.tokens),
                                            error=error))

    async def _prefill(self, session_id: str) -> str | None:
        """Prefill an admitted session one chunk per pass, taking the model lock for each
        pass only: verification batches waiting for the lock go in between (and carry
        chunks of their own), so a long prompt holds none of them up by more than a chunk."""
        while self.verifier.prefilling(session_id):
            async with self._model_lock:
                if not self.verifier.prefilling(session_id):
                    break  # finished by a verification pass meanwhile
                try:
                    await asyncio.to_thread(self.verifier.step, [], self.verifier.prefill_chunk)
                except Exception as exc:  # the session fails; the verifier goes on
                    log.warning("prefill of session %s failed: %r", session_id[:16], exc)
                    self._forget(session_id)
                    return Reason.NO_CAPACITY
        return None if session_id in self.verifier.sessions else Reason.NO_CAPACITY

    async def _open(self, session_id: str, tokens: list[int], params: SamplingSpec, cycle: int,
                    keep: frozenset[str] = frozenset(), prefill: bool = True,
                    prompt_len: int | None = None) -> str | None:
        """Admit a session (and with `prefill`, prefill it now); holds the model lock. When
        the cache is full, the least recently used session (not one in `keep`) is evicted:
        its tokens are in Redis, so it is re-prefilled if it comes back. Returns an error
        reason or None."""
        self._forget(session_id)  # a re-prefill replaces the old cache
        idle = sorted((t, s) for s, t in self._used.items() if s not in keep and s != session_id)
        admit = self.verifier.open if prefill else self.verifier.begin
        while True:
            try:
                await asyncio.to_thread(admit, session_id, tokens, params, cycle, prompt_len)
            except SessionTooLongError:  # longer than any session may be: evicting others cannot help
                self.verifier.close(session_id)
                return Reason.PROMPT_TOO_LONG
            except CacheFullError:
                self.verifier.close(session_id)
                if not idle:
                    return Reason.NO_CAPACITY
                evicted = idle.pop(0)[1]
                log.info("cache full: evicting idle session %s", evicted[:16])
                self._forget(evicted)
                self.evictions += 1
                continue
            except GrammarError as exc:
                self.verifier.close(session_id)
                log.warning("session %s: %s", session_id[:16], exc)
                return Reason.BAD_GRAMMAR
            except ValueError:
                self.verifier.close(session_id)
                return Reason.BAD_PROMPT
            self._used[session_id] = time.monotonic()
            return None

    def _forget(self, session_id: str) -> None:
        self.verifier.close(session_id)
        self._last.pop(session_id, None)
        self._used.pop(session_id, None)

    async def _resume(self, tree: protocol.DraftTreeMsg, keep: frozenset[str]) -> str | None:
        """A tree for a session not held here: re-prefill it from Redis. Returns why not, or None."""
        try:
            record = await self.store.load(tree.session_id)
        except Exception as exc:
            log.warning("cannot read session %s from Redis: %r", tree.session_id[:16], exc)
            return Reason.STATE_UNAVAILABLE
        if record is None:
            return Reason.UNKNOWN_SESSION
        if (record.cycle, len(record.tokens)) != (tree.cycle, tree.committed_len):
            return Reason.STALE_CYCLE
        if any(not 0 <= t < self.verifier.vocab_size for t in record.tokens):
            return Reason.BAD_PROMPT
        if (error := await self._open(tree.session_id, record.tokens, record.sampling, record.cycle,
                                      keep, prompt_len=record.prompt_len or None)) is not None:
            return error
        self.reprefills += 1
        self.metrics.reprefills.inc()
        log.info("session %s re-prefilled from %d committed tokens (cycle %d)", tree.session_id[:16],
                 len(record.tokens), record.cycle)
        return None

    async def on_verify(self, msg: Msg) -> None:
        try:
            request = protocol.decode(msg.data, VerifyBatchRequest)
        except ProtocolError as exc:
            self.reject(exc.reason, "a verify request")
            rejection = Rejection(session_id="", reason=exc.reason)
            await self._reply(msg, VerifyBatchReply(batch_id="", rejected=[rejection]))
            return
        with telemetry.span("verify batch", SpanKind.SERVER, {
                "specedge.batch.id": request.batch_id, "specedge.batch.size": len(request.trees)}) as span:
            reply = await self._verify(request)
            if span is not None:
                span.set_attributes({"specedge.verify.rejected": len(reply.rejected),
                                     "specedge.verify.results": len(reply.results)})
        await self._reply(msg, reply)

    async def _verify(self, request: VerifyBatchRequest) -> VerifyBatchReply:
        async with self._model_lock:
            good, replays, rejected, seen = [], [], [], set()
            batch = frozenset(t.session_id for t in request.trees)
            for tree in request.trees:
                reason = "duplicate_session" if tree.session_id in seen else self.verifier.problem(tree)
                seen.add(tree.session_id)
                last = self._last.get(tree.session_id)
                if reason == Reason.STALE_CYCLE and last is not None and \
                        (last.cycle, last.committed_len) == (tree.cycle, tree.committed_len):
                    replays.append(last)  # the scheduler lost our reply: the same result again
                    continue
                if reason == Reason.UNKNOWN_SESSION:  # re-prefilled from Redis, then the tree itself is checked
                    reason = await self._resume(tree, batch) or self.verifier.problem(tree)
                if reason is None:
                    good.append(tree)
                else:
                    self.reject(reason, f"a tree for session {tree.session_id[:16]}")
                    rejected.append(Rejection(session_id=tree.session_id, reason=reason))
            with telemetry.span("forward pass", attributes={
                    "specedge.batch.size": len(good), "specedge.batch.nodes": sum(len(t.tokens) + 1 for t in good)
            }) as span:
                started, at = time.perf_counter(), time.monotonic()
                # each pass also carries a chunk of any prompt being prefilled
                try:
                    results = await asyncio.to_thread(self.verifier.step, good, self.verifier.prefill_chunk) \
                        if good else []
                except CacheFullError:  # the pool cannot hold these trees: refused, nothing changed
                    for tree in good:
                        self.reject(Reason.NO_CAPACITY, f"a tree for session {tree.session_id[:16]}")
                        rejected.append(Rejection(session_id=tree.session_id, reason=Reason.NO_CAPACITY))
                    good, results = [], []
                forward_ms = 1000 * (time.perf_counter() - started)
                if span is not None:
                    span.set_attribute("specedge.accepted_len", sum(len(r.accepted) for r in results))
            if good:
                self.spans.append([at, time.monotonic()])
                self.metrics.busy.inc(forward_ms / 1000)
                self.metrics.forward_passes.inc()
            committed = []
            reasons = await asyncio.gather(*(self._commit(result) for result in results))  # one round trip
            for result, reason in zip(results, reasons, strict=True):
                if reason is None:
                    committed.append(msgspec.structs.replace(result, verify_ms=forward_ms))
                else:
                    rejected.append(Rejection(session_id=result.session_id, reason=reason))
            self._last.update((r.session_id, r) for r in committed)
            self._used.update((r.session_id, time.monotonic()) for r in committed)
        return VerifyBatchReply(batch_id=request.batch_id, results=committed + replays, rejected=rejected,
                                forward_ms=forward_ms)

    async def _commit(self, result: VerifyResult) -> str | None:
        """Commit a verified cycle to Redis; on refusal drop the local cache (it is ahead of the
        durable state) and return the reason."""
        try:
            if (prompt := self.verifier.take_prompt_logprobs(result.session_id)) is not None:
                await self.store.save_prompt_logprobs(result.session_id, prompt)  # for completions' echo
            outcome = await self.store.commit(result.session_id, result.cycle, result.committed_len,
                                              [*result.accepted, result.bonus])
        except Exception as exc:
            log.warning("cannot commit session %s to Redis: %r", result.session_id[:16], exc)
            outcome = None
        if outcome is Commit.DONE:
            return None
        reason = {Commit.ALREADY: "stale_cycle", Commit.STALE: "stale_cycle",
                  Commit.UNKNOWN: "unknown_session"}.get(outcome, Reason.STATE_UNAVAILABLE)
        self.reject(reason, f"a commit for session {result.session_id[:16]}")
        self._forget(result.session_id)
        return reason

    async def on_close(self, msg: Msg) -> None:
        if (request := self.reject.decode(msg.data, CloseSession, "a close request")) is None:
            return
        async with self._model_lock:
            self._forget(request.session_id)
