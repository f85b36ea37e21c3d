"""One generation as the gateway sees it: open a session on the bus, turn its committed
tokens into text pieces, stop on a stop string, close it when the caller goes away.

Owns the gateway's side of a session's life, including its span while tracing is on:
`chat {model}` (or `text_completion {model}`) with the OpenTelemetry GenAI attributes,
whose context the `SessionOpen` request carries to the scheduler, so that every span of
the generation, on every service, is in its trace. HTTP formatting is `app.py`'s.
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
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from specedge import bus, protocol, subjects, telemetry
from specedge.metrics import GatewayMetrics
from specedge.protocol import CloseSession, SamplingSpec, SessionOpen, SessionOpened, TokenEvent
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
                   on_close: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[Piece]:
    """Text pieces of one generation, in order; the last one carries the finish reason."""
    timing = _Timing(metrics, len(prompt_ids))
    sid = uuid.uuid4().hex
    sub = await bus.subscribe(nc, subjects.session_tokens(sid))
    span = _request_span(spec, sid, len(prompt_ids), max_new_tokens)  # ended below, whatever happens
    context = telemetry.context_of(span)
    request = SessionOpen(
        session_id=sid, tokens=prompt_ids, max_new_tokens=max_new_tokens, eos_ids=codec.eos_ids,
        sampling=SamplingSpec(temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed),
        mode=spec.mode, user=user)
    finished = False
    count, reason = 0, None
    try:
        try:
            reply = await bus.request(nc, subjects.SESSIONS_OPEN, protocol.encode(request), timeout=30,
                                      context=context)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise OpenAIError(503, "no scheduler is available; try again shortly", "server_error",
                              code="unavailable") from None
        opened = protocol.decode(reply.data, SessionOpened)
        if opened.error:
            status = 429 if "room" in opened.error else 503
            raise OpenAIError(status, f"cannot start the generation: {opened.error}", "server_error",
                              code="unavailable")
        text = IncrementalText(codec, spec.stop)
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
            timing.tokens(len(event.tokens))
            piece = text.add(event.tokens)
            if text.stopped:
                reason = "stop"
                timing.finish(reason, count)
                yield Piece(piece, reason, count)
                return
            if event.finished:
                finished, reason = True, event.finish_reason or "stop"
                timing.finish(reason, count)
                yield Piece(piece + text.flush(), reason, count)
                return
            if piece:
                yield Piece(piece, None, count)
    except Exception as exc:
        if span is not None:
            failed = isinstance(exc, OpenAIError)
            span.set_status(Status(StatusCode.ERROR, exc.message if failed else repr(exc)))
            span.set_attribute("error.type", (exc.code or exc.type) if failed else type(exc).__qualname__)
        raise
    finally:
        timing.close()
        if on_close is not None:  # the caller's concurrency slot
            with contextlib.suppress(Exception):
                await on_close()
        await sub.unsubscribe()
        if not finished:  # stop string, error or the client went away: free the session now
            await bus.publish(nc, subjects.SESSIONS_CLOSE, protocol.encode(CloseSession(session_id=sid)),
                              context=context)
        if span is not None:
            span.set_attribute("gen_ai.usage.output_tokens", count)
            if reason is not None:
                span.set_attribute("gen_ai.response.finish_reasons", [reason])
            span.end()


def _request_span(spec: GenerationSpec, session_id: str, prompt_tokens: int, max_new_tokens: int) -> Span | None:
    """The generation's span (a child of the HTTP request's), named and described by the GenAI conventions."""
    if not telemetry.enabled():
        return None
    operation = "chat" if spec.messages is not None else "text_completion"
    return telemetry.tracer.start_span(f"{operation} {spec.model}", kind=SpanKind.CLIENT, attributes={
        "gen_ai.operation.name": operation, "gen_ai.provider.name": "specedge",
        "gen_ai.request.model": spec.model, "gen_ai.response.model": spec.model,
        "gen_ai.request.max_tokens": max_new_tokens, "gen_ai.request.temperature": spec.temperature,
        "gen_ai.request.top_p": spec.top_p, "gen_ai.request.seed": spec.seed,
        "gen_ai.usage.input_tokens": prompt_tokens, "specedge.session.id": session_id, "specedge.mode": spec.mode,
        "specedge.stream": spec.stream})


class _Timing:
    """One request's latencies and tokens, into the gateway's metrics (no-op without them)."""

    def __init__(self, metrics: GatewayMetrics | None, prompt_tokens: int) -> None:
        self.metrics, self.prompt_tokens = metrics, prompt_tokens
        self.started = self.last = time.monotonic()
        self.first = True
        self.done = False
        if metrics is not None:
            metrics.running.inc()

    def tokens(self, n: int) -> None:
        if self.metrics is None or n == 0:
            return
        now = time.monotonic()
        if self.first:
            self.metrics.time_to_first_token.observe(now - self.started)
            self.first = False
        else:
            for _ in range(n):  # a cycle that commits n tokens: n tokens of cycle / n each
                self.metrics.inter_token_latency.observe((now - self.last) / n)
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
