"""One generation as the gateway sees it: open a session on the bus, turn its committed
tokens into text pieces, stop on a stop string, close it when the caller goes away.

Owns the gateway's side of a session's life; HTTP formatting is `app.py`'s.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client

from specedge import protocol, subjects
from specedge.metrics import GatewayMetrics
from specedge.protocol import CloseSession, SamplingSpec, SessionOpen, SessionOpened, TokenEvent
from specedge_gateway.live import LiveStats, RequestStats
from specedge_gateway.openai_api import GenerationSpec, OpenAIError
from specedge_gateway.text import IncrementalText, TextCodec

log = logging.getLogger("specedge_gateway")


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece
    completion_tokens: int = 0        # tokens committed so far


async def generate(nc: Client, codec: TextCodec, spec: GenerationSpec, prompt_ids: list[int],
                   max_new_tokens: int, user: str = "", token_timeout_s: float = 60.0,
                   metrics: GatewayMetrics | None = None,
                   on_close: Callable[[], Awaitable[None]] | None = None,
                   live: LiveStats | None = None, stats: RequestStats | None = None) -> AsyncIterator[Piece]:
    """Text pieces of one generation, in order; the last one carries the finish reason.

    `live` collects recent cycles and latencies for the dashboard; `stats`, this request's
    speculation (drafted and accepted tokens per verification)."""
    timing = _Timing(metrics, len(prompt_ids), live)
    sid = uuid.uuid4().hex
    sub = await nc.subscribe(subjects.session_tokens(sid))
    request = SessionOpen(
        session_id=sid, tokens=prompt_ids, max_new_tokens=max_new_tokens, eos_ids=codec.eos_ids,
        sampling=SamplingSpec(temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed),
        mode=spec.mode, user=user)
    finished = False
    try:
        try:
            reply = await nc.request(subjects.SESSIONS_OPEN, protocol.encode(request), timeout=30)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise OpenAIError(503, "no scheduler is available; try again shortly", "server_error",
                              code="unavailable") from None
        opened = protocol.decode(reply.data, SessionOpened)
        if opened.error:
            status = 429 if "room" in opened.error else 503
            raise OpenAIError(status, f"cannot start the generation: {opened.error}", "server_error",
                              code="unavailable")
        text = IncrementalText(codec, spec.stop)
        count = 0
        while True:
            try:
                msg = await sub.next_msg(timeout=token_timeout_s)
            except nats.errors.TimeoutError:
                raise OpenAIError(503, "the generation stalled", "server_error", code="timeout") from None
            event = protocol.decode(msg.data, TokenEvent)
            if event.index != count:
                log.error("session %s: token event at %d, expected %d", sid, event.index, count)
                raise OpenAIError(500, "token stream out of order", "server_error")
            if event.error:
                finished = True  # the scheduler has ended it already
                raise OpenAIError(503, f"the generation failed: {event.error}", "server_error", code="unavailable")
            count += len(event.tokens)
            timing.tokens(event)
            if stats is not None and event.tokens:
                stats.cycle(event.drafted, event.accepted)
            piece = text.add(event.tokens)
            if text.stopped:
                timing.finish("stop", count)
                yield Piece(piece, "stop", count)
                return
            if event.finished:
                finished = True
                timing.finish(event.finish_reason or "stop", count)
                yield Piece(piece + text.flush(), event.finish_reason or "stop", count)
                return
            if piece:
                yield Piece(piece, None, count)
    finally:
        timing.close()
        if on_close is not None:  # the caller's concurrency slot
            with contextlib.suppress(Exception):
                await on_close()
        await sub.unsubscribe()
        if not finished:  # stop string, error or the client went away: free the session now
            await nc.publish(subjects.SESSIONS_CLOSE, protocol.encode(CloseSession(session_id=sid)))


class _Timing:
    """One request's latencies and tokens, into the gateway's metrics and live view (each optional)."""

    def __init__(self, metrics: GatewayMetrics | None, prompt_tokens: int, live: LiveStats | None = None) -> None:
        self.metrics, self.prompt_tokens, self.live = metrics, prompt_tokens, live
        self.started = self.last = time.monotonic()
        self.first = True
        self.done = False
        if metrics is not None:
            metrics.running.inc()
        if live is not None:
            live.running += 1

    def tokens(self, event: TokenEvent) -> None:
        n = len(event.tokens)
        if n == 0:
            return
        now = time.monotonic()
        if self.live is not None:
            self.live.cycle(now, n, event.drafted, event.accepted)
        if self.first:
            if self.metrics is not None:
                self.metrics.time_to_first_token.observe(now - self.started)
            if self.live is not None:
                self.live.first_token(now, now - self.started)
            self.first = False
        else:
            per_token = (now - self.last) / n  # a cycle that commits n tokens: n tokens of cycle / n each
            if self.metrics is not None:
                for _ in range(n):
                    self.metrics.inter_token_latency.observe(per_token)
            if self.live is not None:
                self.live.inter_token(now, per_token)
        self.last = now

    def finish(self, reason: str, generated: int) -> None:
        if self.metrics is None or self.done:
            return
        self.done = True
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.started)
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.generation_tokens.inc(generated)
        self.metrics.requests.labels(reason).inc()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.running.dec()
        if self.live is not None:
            self.live.running -= 1
