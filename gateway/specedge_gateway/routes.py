"""The gateway's routes: the OpenAI API (`api`) and the operator's endpoints (`ops`).

Each route takes what it needs as dependencies — the `Gateway` (what `create_app` built
and the lifespan connected, on `app.state.gateway`) and the caller's user from their API
key — and answers with the typed models of `responses`. A generation's life (the
per-key slot, the session on the bus, its close) is one async context manager,
`Gateway.generation`, so a stream that ends, fails or loses its client always lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from specedge import registry
from specedge.metrics import GatewayMetrics
from specedge.protocol import ServiceAnnouncement, TokenLogprob
from specedge_gateway.live import LiveStats, RequestStats
from specedge_gateway.openai_api import (
    MAX_CHARS_PER_TOKEN,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationSpec,
    OpenAIError,
    TokenizeRequest,
    check_fields,
    received,
    to_generation,
)
from specedge_gateway.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    DeltaToolCall,
    Head,
    ToolCall,
    Usage,
    prompt_logprobs_of,
    sse,
)
from specedge_gateway.sessions import Piece, generate
from specedge_gateway.settings import GatewaySettings
from specedge_gateway.structured import after_thinking, tool_calls_of
from specedge_gateway.text import HermesToolCalls, ReasoningSplit, TextCodec

log = logging.getLogger("specedge_gateway")


@dataclasses.dataclass
class Gateway:
    """One gateway's parts: built by `create_app`, connected by its lifespan."""

    settings: GatewaySettings
    codec: TextCodec
    served_model: str
    metrics: GatewayMetrics
    live: LiveStats
    me: ServiceAnnouncement
    nc: Any = None  # the lifespan's NATS connection,
    keys: Any = None  # API keys, the per-key concurrency limit and the committed tokens in Redis
    limit: Any = None
    store: Any = None

    def prepare(self, spec: GenerationSpec) -> tuple[list[int], int, GenerationSpec]:
        """The prompt's ids, how many tokens to generate and the spec to generate by (a chat's
        structured output held after its reasoning, under a reasoning parser, unless the
        prompt has closed the reasoning already — as vLLM holds it), or the reason it cannot
        be served."""
        settings, served = self.settings, self.served_model
        if spec.model != served:
            raise OpenAIError(404, f"model {spec.model!r} does not exist; this server serves {served!r}",
                              "not_found_error", "model", "model_not_found")
        param = "messages" if spec.messages is not None else "prompt"
        chars = sum(len(m["content"]) for m in spec.messages) if spec.messages is not None else \
            len(spec.prompt) if isinstance(spec.prompt, str) else 0
        if chars > settings.max_context * MAX_CHARS_PER_TOKEN:  # cannot fit: refused before any work on it
            raise OpenAIError(400, f"the prompt has {chars} characters; the context holds {settings.max_context} "
                              "tokens", param=param, code="context_length_exceeded")
        try:
            prompt = self.codec.chat_prompt(spec.messages, spec.tools, spec.template_kwargs) \
                if spec.messages is not None else spec.prompt
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="messages", code="invalid_messages") from None
        if settings.reasoning_parser and spec.grammar and spec.messages is not None \
                and not prompt.rstrip().endswith(ReasoningSplit.END):  # (e.g. Qwen3's enable_thinking: false)
            spec = dataclasses.replace(spec, grammar=after_thinking(spec.grammar))
        if isinstance(prompt, tuple):  # token ids
            if max(prompt) >= self.codec.vocab_size:
                raise OpenAIError(400, f"token id {max(prompt)} is not in the vocabulary ({self.codec.vocab_size} "
                                  "tokens)", param="prompt", code="invalid_value")
            ids = list(prompt)
        else:
            ids = self.codec.encode(prompt)
        room = settings.max_context - len(ids)
        if not ids or room < 1:
            raise OpenAIError(400, f"the prompt is {len(ids)} tokens; the context holds {settings.max_context}",
                              param=param, code="context_length_exceeded")
        wanted = spec.max_tokens or min(settings.default_max_tokens, room)
        if wanted > room:
            raise OpenAIError(400, f"max_tokens {wanted} exceeds the {room} tokens left in the context",
                              param="max_tokens", code="context_length_exceeded")
        return ids, wanted, spec

    @contextlib.asynccontextmanager
    async def generation(self, spec: GenerationSpec, user: str,
                         received: float | None = None) -> AsyncIterator[Generation]:
        """Prepare (off the event loop), take the user's slot, open the session; on exit,
        close the session and give the slot back — whatever ended it."""
        ids, max_new, spec = await asyncio.to_thread(self.prepare, spec)  # templating and tokenizing
        if user and not await self.limit.acquire(user):
            raise OpenAIError(429, f"too many concurrent requests for this API key (at most "
                              f"{self.settings.max_concurrent_per_key}); retry when one finishes",
                              "rate_limit_error", code="rate_limit_exceeded")
        try:
            stats = RequestStats(mode=spec.mode, seed=spec.seed)
            pieces = generate(self.nc, self.codec, spec, ids, max_new, user, metrics=self.metrics, live=self.live,
                              stats=stats, store=self.store, received=received)
            async with contextlib.aclosing(pieces):
                yield Generation(len(ids), pieces, stats)
        finally:  # (here, not in the generator: one never started never runs its own cleanup)
            if user:
                try:  # (shielded: a client going away must not cancel it half-way)
                    await asyncio.shield(self.limit.release(user))
                except Exception as exc:  # Redis down: the slot expires with its key's TTL
                    log.warning("could not give back a concurrency slot of %s: %r", user, exc)


@dataclasses.dataclass
class Generation:
    prompt_tokens: int
    pieces: AsyncIterator[Piece]
    stats: RequestStats


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


_bearer = HTTPBearer(auto_error=False, description="An API key from `specedge keys create`.")


async def caller(gw: Annotated[Gateway, Depends(gateway)],
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The caller's user name, from their API key ("" when keys are not required)."""
    if not gw.settings.require_api_key:
        return ""
    if credentials is None:
        raise OpenAIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    try:
        user = await gw.keys.user_of(credentials.credentials)
    except Exception as exc:
        log.warning("cannot check an API key: %r", exc)
        raise OpenAIError(503, "cannot check the API key right now", "server_error", code="unavailable") from None
    if user is None:
        raise OpenAIError(401, "incorrect API key provided", code="invalid_api_key")
    return user


GatewayDep = Annotated[Gateway, Depends(gateway)]
UserDep = Annotated[str, Depends(caller)]
ReceivedDep = Annotated[float, Depends(received)]
api = APIRouter()
ops = APIRouter()


@api.post("/v1/chat/completions", response_model=None,
          responses={200: {"model": ChatCompletion, "description": "The reply; with `stream`, server-sent "
                                                                   "`chat.completion.chunk` events"}})
async def chat_completions(body: ChatCompletionRequest, gw: GatewayDep, user: UserDep, at: ReceivedDep
                           ) -> ChatCompletion | StreamingResponse:
    _check(body, gw)
    return await _respond(gw, to_generation(body), chat=True, user=user, received=at)


@api.post("/v1/completions", response_model=None,
          responses={200: {"model": Completion, "description": "The reply; with `stream`, server-sent "
                                                               "`text_completion` events"}})
async def completions(body: CompletionRequest, gw: GatewayDep, user: UserDep,
                      at: ReceivedDep) -> Completion | StreamingResponse:
    _check(body, gw)
    return await _respond(gw, to_generation(body), chat=False, user=user, received=at)


def _check(body: ChatCompletionRequest | CompletionRequest, gw: Gateway) -> None:
    if ignored := check_fields(body, gw.settings.lenient):
        log.warning("ignored request field(s) nobody knows: %s", ", ".join(ignored))


@api.post("/tokenize")
async def tokenize(body: TokenizeRequest, gw: GatewayDep, user: UserDep) -> dict:
    """vLLM's: the ids of a prompt, or of chat messages through the chat template."""
    _served(gw, body.model)
    if body.messages is not None:
        try:
            prompt = gw.codec.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="messages", code="invalid_messages") from None
    else:
        prompt = body.prompt
    if len(prompt) > gw.settings.max_context * MAX_CHARS_PER_TOKEN:
        raise OpenAIError(400, "the prompt cannot fit in the context", param="prompt", code="context_length_exceeded")
    ids = await asyncio.to_thread(gw.codec.encode, prompt)
    return {"count": len(ids), "max_model_len": gw.settings.max_context, "tokens": ids}


@api.post("/detokenize")
async def detokenize(body: DetokenizeRequest, gw: GatewayDep, user: UserDep) -> dict:
    """vLLM's: the text of token ids."""
    _served(gw, body.model)
    vocab = gw.codec.tokenizer.get_vocab_size()
    if any(t >= vocab for t in body.tokens):
        raise OpenAIError(400, f"token ids must be below the vocabulary size {vocab}", param="tokens",
                          code="invalid_value")
    return {"prompt": await asyncio.to_thread(gw.codec.decode, body.tokens)}


def _served(gw: Gateway, model: str | None) -> None:
    if model is not None and model != gw.served_model:
        raise OpenAIError(404, f"model {model!r} does not exist; this server serves {gw.served_model!r}",
                          "not_found_error", "model", "model_not_found")


@api.get("/v1/models")
async def models(gw: GatewayDep, user: UserDep) -> dict:
    found = await registry.discover(gw.nc, wait_s=0.2)
    names = sorted({a.details.get("model", "") for a in found if a.role == "verifier"} - {""})
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "specedge"} for n in names]}


async def _respond(gw: Gateway, spec: GenerationSpec, chat: bool, user: str,
                   received: float | None = None) -> ChatCompletion | Completion | StreamingResponse:
    """One reply of `spec.choices()`: each choice its own session, all generating at once."""
    head = Head(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", created=int(time.time()),
                model=gw.served_model)
    specs = spec.choices()
    if not spec.stream:
        done = await _complete_all(gw, specs, user, received)
        head.system_fingerprint = done[0].run.stats.system_fingerprint
        usage = Usage.of(sum(d.run.prompt_tokens for d in done[::spec.n]), sum(d.last.completion_tokens for d in done))
        stats = done[0].run.stats.as_dict() if len(done) == 1 else \
            {**done[0].run.stats.as_dict(), "choices": [d.run.stats.as_dict() for d in done]}
        wanted, text_of = spec.logprobs >= 0, gw.codec.token_text
        if chat:
            return ChatCompletion(**head.model_dump(), usage=usage, specedge=stats, prompt_logprobs=prompt_logprobs_of(
                done[0].prompt_logprobs, text_of, spec.prompt_logprobs), choices=[
                ChatChoice(index=i, message=(message := _message(d.text, gw.settings, spec)),
                           finish_reason=_finish(d.last.finish_reason, message.tool_calls, spec),
                           logprobs=ChatLogprobs.of(d.logprobs, text_of) if wanted else None)
                for i, d in enumerate(done)])
        return Completion(**head.model_dump(), usage=usage, specedge=stats, choices=[
            CompletionChoice(index=i, text=d.text, finish_reason=d.last.finish_reason,
                             logprobs=CompletionLogprobs.of(d.logprobs, text_of, spec.logprobs) if wanted else None,
                             prompt_logprobs=prompt_logprobs_of(d.prompt_logprobs, text_of, spec.prompt_logprobs))
            for i, d in enumerate(done)])
    stack = contextlib.AsyncExitStack()
    async with stack:
        runs = [await stack.enter_async_context(gw.generation(s, user, received)) for s in specs]
        # errors before the first token are still plain HTTP errors
        firsts = await asyncio.gather(*(anext(run.pieces) for run in runs), return_exceptions=True)
        if failed := [f for f in firsts if isinstance(f, BaseException)]:
            raise failed[0]  # (every choice has stopped: each generation closes cleanly)
        head.system_fingerprint = runs[0].stats.system_fingerprint
        owned = stack.pop_all()  # from here the stream closes the generations
    return StreamingResponse(_stream(owned, runs, list(firsts), head, chat, spec, gw.codec.token_text, gw.settings),
                             media_type="text/event-stream")


def _message(text: str, settings: GatewaySettings, spec: GenerationSpec) -> AssistantMessage:
    reasoning, content = ReasoningSplit().split(text) if settings.reasoning_parser else (None, text)
    if spec.tool_call or spec.tools_required:  # a forced call: its grammar's JSON (after any reasoning)
        if (calls := tool_calls_of(content, spec.tool_call, spec.tools_required)) is not None:
            return AssistantMessage(content=None, reasoning_content=reasoning, tool_calls=ToolCall.of(calls))
    content, calls = HermesToolCalls().split(content) if _parses_calls(settings, spec) else (content, None)
    return AssistantMessage(content=content, reasoning_content=reasoning,
                            tool_calls=ToolCall.of(calls) if calls else None)


def _parses_calls(settings: GatewaySettings, spec: GenerationSpec) -> bool:
    """Whether a chat reply is read for tool calls: the gateway's `--tool-call-parser`, with
    tools offered and the choice left to the model (`tool_choice` `auto`)."""
    return bool(settings.tool_call_parser and spec.tools and not (spec.tool_call or spec.tools_required))


def _finish(reason: str | None, calls: list | None, spec: GenerationSpec) -> str | None:
    """OpenAI's: `tool_calls` when the model chose to call (`required`, or `auto` read by the
    tool-call parser), `stop` when it was told which function to call."""
    return "tool_calls" if calls and not spec.tool_call and reason == "stop" else reason


@dataclasses.dataclass
class _Done:
    run: Generation
    text: str
    last: Piece
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None  # vLLM's field, when asked


async def _complete_all(gw: Gateway, specs: list[GenerationSpec], user: str,
                        received: float | None = None) -> list[_Done]:
    """Every choice to its end. Their slots are taken one after another (a choice that finds
    the key full fails the request before any session starts), then they generate at once;
    nothing is cancelled half-way, so every slot taken is given back."""
    async def one(run: Generation) -> _Done:
        text, last, logprobs, prompt = [], None, [], None
        async for piece in run.pieces:
            text.append(piece.text)
            logprobs += piece.logprobs
            prompt = prompt or piece.prompt_logprobs
            last = piece
        return _Done(run, "".join(text), last, logprobs, prompt)

    async with contextlib.AsyncExitStack() as stack:
        runs = [await stack.enter_async_context(gw.generation(spec, user, received)) for spec in specs]
        done = await asyncio.gather(*(one(run) for run in runs), return_exceptions=True)
    if failed := [d for d in done if isinstance(d, BaseException)]:
        raise failed[0]
    return done


async def _stream(owned: contextlib.AsyncExitStack, runs: list[Generation], firsts: list[Piece], head: Head,
                  chat: bool, spec: GenerationSpec, text_of: Callable[[int], str],
                  settings: GatewaySettings) -> AsyncIterator[str]:
    include_usage, n = spec.include_usage, spec.n
    offsets = [0] * len(runs)  # per choice: where its next text starts (completions' text_offset)
    splits = [ReasoningSplit() for _ in runs] if chat and settings.reasoning_parser else None
    parsers = [HermesToolCalls() for _ in runs] if chat and _parses_calls(settings, spec) else None

    def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False,
              logprobs: list[TokenLogprob] | None = None) -> str:
        if chat:
            if role:
                delta = ChatDelta(role="assistant")
            elif splits is not None or parsers is not None:
                reasoning, content = ("", text or "") if splits is None else \
                    splits[index].flush() if finish else splits[index].add(text or "")
                calls = None
                if parsers is not None:
                    content = parsers[index].add(content)
                    if finish:
                        tail, calls = parsers[index].flush()
                        content, finish = content + tail, _finish(finish, calls, spec)
                delta = ChatDelta(content=content or None, reasoning_content=reasoning or None, tool_calls=[
                    DeltaToolCall(index=k, **call.model_dump()) for k, call in enumerate(ToolCall.of(calls))]
                    if calls else None)
            else:
                delta = ChatDelta(content=text or None)
            chat_lp = ChatLogprobs.of(logprobs, text_of) if logprobs else None
            return sse(head.chat_chunk(delta, finish, index, chat_lp), include_usage)
        text_lp = CompletionLogprobs.of(logprobs, text_of, spec.logprobs, offsets[index]) if logprobs else None
        offsets[index] += len(text or "")
        return sse(head.text_chunk(text or "", finish, index, text_lp), include_usage)

    pieces: asyncio.Queue[tuple[int, Piece | OpenAIError]] = asyncio.Queue()

    async def pump(index: int, run: Generation, piece: Piece) -> None:
        try:
            while True:
                await pieces.put((index, piece))
                if piece.finish_reason is not None:
                    return
                piece = await anext(run.pieces)
        except OpenAIError as exc:
            await pieces.put((index, exc))

    forced = chat and bool(spec.tool_call or spec.tools_required)  # a forced call: sent whole, at its end
    held = [""] * len(runs)

    def tool_calls(index: int, piece: Piece) -> Iterator[str]:
        held[index] += piece.text
        if piece.logprobs:
            yield chunk(index, None, logprobs=piece.logprobs)
        if piece.finish_reason is None:
            return
        reasoning, content = ReasoningSplit().split(held[index]) if splits is not None else (None, held[index])
        if calls := tool_calls_of(content, spec.tool_call, spec.tools_required):
            delta = ChatDelta(reasoning_content=reasoning or None, tool_calls=[
                DeltaToolCall(index=k, **call.model_dump()) for k, call in enumerate(ToolCall.of(calls))])
            yield sse(head.chat_chunk(delta, None, index), include_usage)
        else:  # cut short by max_tokens: the text as it is
            yield chunk(index, held[index])
        yield chunk(index, None, _finish(piece.finish_reason, calls, spec))

    lasts: dict[int, Piece] = {}
    async with owned:  # a client that went away closes its sessions
        if chat:
            for index in range(len(runs)):
                yield chunk(index, None, role=True)
        pumps = [asyncio.create_task(pump(i, run, first)) for i, (run, first) in enumerate(zip(runs, firsts,
                                                                                                 strict=True))]
        try:
            while len(lasts) < len(runs):
                index, piece = await pieces.get()
                if isinstance(piece, OpenAIError):
                    error = {"message": piece.message, "type": piece.type, "param": piece.param, "code": piece.code}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                if forced:
                    for event in tool_calls(index, piece):
                        yield event
                    if piece.finish_reason is not None:
                        lasts[index] = piece
                    continue
                if piece.text or piece.logprobs:
                    yield chunk(index, piece.text, logprobs=piece.logprobs)
                if piece.finish_reason is not None:
                    lasts[index] = piece
                    yield chunk(index, None, piece.finish_reason)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    if include_usage:
        final = head.chat_chunk(ChatDelta()) if chat else head.text_chunk("")
        final.choices = []
        final.usage = Usage.of(sum(run.prompt_tokens for run in runs[::n]),
                               sum(last.completion_tokens for last in lasts.values()))
        yield sse(final, include_usage=True)
    yield "data: [DONE]\n\n"


@ops.get("/metrics", include_in_schema=False)
async def prometheus_metrics(gw: GatewayDep) -> Response:
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@ops.get("/health")
async def health(gw: GatewayDep) -> JSONResponse:
    found = await registry.discover(gw.nc, wait_s=0.2)
    verifiers = sum(1 for a in found if a.role == "verifier")
    return JSONResponse({"status": "ok" if verifiers else "no verifier", "verifiers": verifiers},
                        status_code=200 if verifiers else 503)
