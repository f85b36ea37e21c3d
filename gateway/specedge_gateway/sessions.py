"""One generation as the gateway sees it: open a session on the bus, turn its committed
tokens into text pieces, stop on a stop string, close it when the caller goes away.

Owns the gateway's side of a session's life, including its span while tracing is on:
`chat {model}` (or `text_completion {model}`) with the OpenTelemetry GenAI attributes,
whose context the `SessionOpen` request carries to the scheduler, so that every span of
the generation, on every service, is in its trace. HTTP formatting is `app.py`'s.

Token events travel over core NATS, so one can be lost (the bus restarted) or come twice
(a scheduler that took the session over re-sends its output from index 0). Each event says
the output position of its first token: tokens already had are skipped, and a gap — or a
silence of `resync_s` — is filled from the committed tokens in Redis (`_Resync`), which
always run ahead of the events (each fill is a `resync` event on the request's span). So
the caller gets every token once, in order; if the session's end was lost with its record,
or nothing comes for `token_timeout_s`, the request fails with a clear error instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.client import Client
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from specedge import bus, protocol, subjects, telemetry
from specedge.metrics import GatewayMetrics
from specedge.protocol import (
    CloseSession,
    Reason,
    SamplingSpec,
    SessionOpen,
    SessionOpened,
    TokenEvent,
    TokenLogprob,
    cut_output,
)
from specedge.state import SessionStore
from specedge_gateway.live import LiveStats, RequestStats
from specedge_gateway.openai_api import GenerationSpec, OpenAIError
from specedge_gateway.text import IncrementalText, TextCodec

log = logging.getLogger("specedge_gateway")


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece
    completion_tokens: int = 0        # tokens committed so far
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # of the tokens since the last piece
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first piece, when `spec.prompt_logprobs` asks


async def generate(nc: Client, codec: TextCodec, spec: GenerationSpec, prompt_ids: list[int],
                   max_new_tokens: int, user: str = "", token_timeout_s: float = 60.0,
                   metrics: GatewayMetrics | None = None,
                   live: LiveStats | None = None, stats: RequestStats | None = None,
                   store: SessionStore | None = None, resync_s: float = 2.0,
                   received: float | None = None) -> AsyncIterator[Piece]:
    """Text pieces of one generation, in order; the last one carries the finish reason.

    `live` collects recent cycles and latencies for the dashboard; `stats`, this request's
    speculation (drafted and accepted tokens per verification); `store`, the committed
    tokens that fill events lost in transit."""
    timing = _Timing(metrics, len(prompt_ids), live, received)
    sid = uuid.uuid4().hex
    sub = await bus.subscribe(nc, subjects.session_tokens(sid))
    span = _request_span(spec, sid, len(prompt_ids), max_new_tokens)  # ended below, whatever happens
    context = telemetry.context_of(span)
    request = SessionOpen(
        session_id=sid, tokens=prompt_ids, max_new_tokens=max_new_tokens, eos_ids=spec.end_ids(codec.eos_ids),
        sampling=SamplingSpec(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k, seed=spec.seed,
                              logprobs=spec.logprobs, min_p=spec.min_p, presence_penalty=spec.presence_penalty,
                              frequency_penalty=spec.frequency_penalty, repetition_penalty=spec.repetition_penalty,
                              logit_bias=dict(spec.logit_bias), min_tokens=spec.min_tokens,
                              end_ids=spec.end_ids(codec.eos_ids) if spec.min_tokens or spec.grammar else [],
                              grammar=spec.grammar,
                              prompt_logprobs=max(spec.logprobs if spec.echo else -1, spec.prompt_logprobs)),
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
        if opened.error == Reason.PROMPT_TOO_LONG:
            raise OpenAIError(400, "the prompt is longer than the verifiers hold per session (their --max-len)",
                              param="messages", code="context_length_exceeded")
        if opened.error:
            status = 429 if "room" in opened.error else 503
            raise OpenAIError(status, f"cannot start the generation: {opened.error}", "server_error",
                              code="unavailable")
        if stats is not None:
            stats.engine = opened.engine
        text = IncrementalText(codec, spec.stop)
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not gone out yet
        prompt: list[TokenLogprob] | None = None  # the prompt's, until the first piece carries them
        resync = _Resync(store, sid, request, span)
        quiet_since = time.monotonic()
        while True:
            for event in await _next_events(sub, resync, count, min(resync_s, token_timeout_s)):
                if time.monotonic() - quiet_since >= token_timeout_s and not event.tokens and not event.finished:
                    raise OpenAIError(503, "the generation stalled", "server_error", code="timeout")
                if event.index < count:  # a re-sent part: skip what we have
                    skip = count - event.index
                    if skip >= len(event.tokens) and not (event.finished or event.error):
                        continue
                    event = msgspec.structs.replace(event, index=count, tokens=event.tokens[skip:],
                                                    logprobs=event.logprobs[skip:])
                if event.error:
                    finished = True  # the scheduler has ended it already
                    raise OpenAIError(503, f"the generation failed: {event.error}", "server_error",
                                      code="unavailable")
                if not event.tokens and not event.finished:
                    continue  # quiet: nothing new
                quiet_since = time.monotonic()
                count += len(event.tokens)
                timing.tokens(event)
                if stats is not None and event.tokens:
                    stats.cycle(event.drafted, event.accepted)
                if spec.logprobs >= 0:  # (tokens read back from Redis have none: unknown)
                    pending += event.logprobs if len(event.logprobs) == len(event.tokens) else \
                        [TokenLogprob(t, None) for t in event.tokens]
                if count == len(event.tokens) and request.sampling.prompt_logprobs >= 0:  # the first tokens
                    prompt = await _prompt_logprobs(store, sid, prompt_ids)
                if spec.echo and count == len(event.tokens):  # the prompt goes first
                    echo = spec.prompt if isinstance(spec.prompt, str) else codec.decode(prompt_ids)
                    yield Piece(echo, None, 0, [msgspec.structs.replace(e, top=e.top[:spec.logprobs], rank=None)
                                                for e in prompt] if spec.logprobs >= 0 else [],
                                prompt if spec.prompt_logprobs >= 0 else None)
                    prompt = None
                piece = text.add(event.tokens)
                if text.stopped:
                    reason = "stop"
                    timing.finish(reason, count)
                    yield Piece(piece, reason, count, pending, prompt)
                    return
                if event.finished:
                    finished, reason = True, event.finish_reason or "stop"
                    timing.finish(reason, count)
                    yield Piece(piece + text.flush(), reason, count, pending, prompt)
                    return
                if piece:
                    yield Piece(piece, None, count, pending, prompt)
                    pending, prompt = [], None
    except Exception as exc:
        if span is not None:
            failed = isinstance(exc, OpenAIError)
            span.set_status(Status(StatusCode.ERROR, exc.message if failed else repr(exc)))
            span.set_attribute("error.type", (exc.code or exc.type) if failed else type(exc).__qualname__)
        raise
    finally:
        timing.close()
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


async def _next_events(sub, resync: _Resync, count: int, wait_s: float) -> list[TokenEvent]:
    """The next event off the bus — preceded by the committed tokens it skipped past, if
    events were lost — or, after `wait_s` of quiet, what Redis has beyond `count` (an empty
    event when nothing is new)."""
    try:
        event = protocol.decode((await sub.next_msg(timeout=wait_s)).data, TokenEvent)
    except nats.errors.TimeoutError:
        quiet = TokenEvent(session_id=resync.sid, index=count, tokens=[])
        return [await resync.after(count, gap=False) or quiet]
    if event.index <= count:
        return [event]
    log.warning("session %s: token event at %d, expected %d; filling the gap from Redis", resync.sid[:16],
                event.index, count)
    filled = await resync.after(count, gap=True)
    if filled is None or filled.error or count + len(filled.tokens) < event.index:
        raise OpenAIError(503, "the generation lost tokens in transit and they could not be recovered; retry",
                          "server_error", code="unavailable")
    gap = msgspec.structs.replace(filled, tokens=filled.tokens[:event.index - count], finished=False,
                                  finish_reason=None)
    return [gap, event]


class _Resync:
    """The committed output in Redis as a `TokenEvent` from a given position, cut at
    end-of-turn or `max_tokens` as the scheduler cuts it."""

    def __init__(self, store: SessionStore | None, sid: str, request: SessionOpen,
                 span: Span | None = None) -> None:
        self.store, self.sid, self.request = store, sid, request
        self.span = span  # the request's span (tracing on): each fill is an event on it
        self.misses = 0  # looks in a row that found no record

    async def after(self, count: int, gap: bool) -> TokenEvent | None:
        """New tokens after `count`, or None (nothing new, or Redis unreachable: wait on).

        The record vanishes when its session ends, just after the last event was sent. After
        a quiet period (`gap` False) that last event gets one more period to arrive; then —
        or at once for a gap — a missing record means the end was lost: an error event."""
        if self.store is None:
            return None
        try:
            record = await self.store.load(self.sid)
        except Exception as exc:
            log.warning("session %s: cannot read its committed tokens: %r", self.sid[:16], exc)
            return None
        if record is None:
            self.misses += 1
            if not gap and self.misses < 2:
                return None
            return TokenEvent(session_id=self.sid, index=count, tokens=[], finished=True, finish_reason="error",
                              error="its end did not arrive and its record is gone (was the message bus or "
                                    "Redis restarted?); retry")
        self.misses = 0
        output = record.output
        kept, reason = cut_output(output, set(self.request.eos_ids), self.request.max_new_tokens)
        end = len(kept)
        if end <= count and reason is None:
            return None
        if self.span is not None:
            self.span.add_event("resync", {"specedge.resync.from": count, "specedge.resync.tokens": max(0, end - count),
                                           "specedge.resync.gap": gap})
        return TokenEvent(session_id=self.sid, index=count, tokens=output[count:end], finished=reason is not None,
                          finish_reason=reason)


class _Timing:
    """One request's latencies and tokens, into the gateway's metrics and live view (each optional)."""

    def __init__(self, metrics: GatewayMetrics | None, prompt_tokens: int, live: LiveStats | None = None,
                 received: float | None = None) -> None:
        """`received`: when the request reached the gateway (`time.monotonic()`; default now)."""
        self.metrics, self.prompt_tokens, self.live = metrics, prompt_tokens, live
        self.started = self.last = time.monotonic() if received is None else received
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


async def _prompt_logprobs(store: SessionStore | None, sid: str, prompt_ids: list[int]) -> list[TokenLogprob]:
    """The prompt's logprobs the verifier saved in Redis (null ones if they cannot be read)."""
    try:
        entries = await store.take_prompt_logprobs(sid) if store is not None else None
    except Exception as exc:  # Redis unreachable: the echo goes on without them
        log.warning("cannot read the prompt logprobs of %s: %r", sid[:16], exc)
        entries = None
    return entries if entries is not None and len(entries) == len(prompt_ids) else \
        [TokenLogprob(t, None) for t in prompt_ids]
