"""What the gateway answers, as typed models of OpenAI's response objects.

Owns the shape of `chat.completion`, `text_completion` and their streamed chunks (one
model each, serialised by pydantic), plus SpecEdge's `specedge` extension field on
non-streaming replies. The routes fill them; nothing here knows about sessions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel

from specedge.protocol import TokenLogprob


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float | None  # None: not known (a token read back from Redis after a lost event)
    bytes: list[int]


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A chat choice's `logprobs`: each token's, with its best alternatives."""

    content: list[ContentLogprob]

    @classmethod
    def of(cls, entries: list[TokenLogprob], text_of: Callable[[int], str]) -> ChatLogprobs:
        def one(token: int, logprob: float | None) -> TopLogprob:
            text = text_of(token)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        return cls(content=[ContentLogprob(**one(e.token, e.logprob).model_dump(),
                                           top_logprobs=[one(t, lp) for t, lp in e.top]) for e in entries])


class CompletionLogprobs(BaseModel):
    """A completion choice's `logprobs` (the legacy shape): tokens, their logprobs, the best
    alternatives of each and each token's offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None  # None for a token with no logprob (the prompt's first)
    text_offset: list[int]

    @classmethod
    def of(cls, entries: list[TokenLogprob], text_of: Callable[[int], str], top: int,
           offset: int = 0) -> CompletionLogprobs:
        tokens = [text_of(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return cls(tokens=tokens, token_logprobs=[e.logprob for e in entries], text_offset=offsets,
                   top_logprobs=[{text_of(t): lp for t, lp in e.top} if e.logprob is not None else None
                                 for e in entries] if top else None)


class PromptLogprob(BaseModel):
    """vLLM's `Logprob`: one entry of a prompt position's `prompt_logprobs`."""

    logprob: float
    rank: int | None
    decoded_token: str


def prompt_logprobs_of(entries: list[TokenLogprob] | None, text_of: Callable[[int], str],
                       top: int) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs` (None when not asked): per prompt token, None for the first
    (nothing precedes it) and for one whose logprob is unknown, else the token's own entry
    (its rank among the vocabulary) and its position's `top` best, ranked 1..top."""
    if entries is None or top < 0:
        return None

    def position(entry: TokenLogprob) -> dict[str, PromptLogprob] | None:
        if entry.logprob is None:
            return None
        found = {str(entry.token): PromptLogprob(logprob=entry.logprob, rank=entry.rank,
                                                 decoded_token=text_of(entry.token))}
        for rank, (token, logprob) in enumerate(entry.top[:top], start=1):
            found[str(token)] = PromptLogprob(logprob=logprob, rank=rank, decoded_token=text_of(token))
        return found

    return [position(e) for e in entries]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @classmethod
    def of(cls, calls: list[tuple[str, str]]) -> list[ToolCall]:
        return [cls(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))
                for name, arguments in calls]


class DeltaToolCall(ToolCall):
    index: int  # its place among the choice's calls


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # with `--reasoning-parser`: what it wrote inside <think>
    tool_calls: list[ToolCall] | None = None  # a forced tool call (`tool_choice` required or a named function)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's, when asked (not streamed)


class Head(BaseModel):
    """What every reply and chunk of one request shares."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None

    def chat_chunk(self, delta: ChatDelta, finish: str | None = None, index: int = 0,
                   logprobs: ChatLogprobs | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.model_dump(), choices=[ChatChunkChoice(
            index=index, delta=delta, finish_reason=finish, logprobs=logprobs)])

    def text_chunk(self, text: str, finish: str | None = None, index: int = 0,
                   logprobs: CompletionLogprobs | None = None) -> CompletionChunk:
        return CompletionChunk(**self.model_dump(), choices=[CompletionChoice(
            index=index, text=text, finish_reason=finish, logprobs=logprobs)])


class ChatCompletion(Head):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's, when asked (the first choice's)
    specedge: dict[str, Any]  # this request's speculation (`live.RequestStats`)


class Completion(Head):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    specedge: dict[str, Any]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Head):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(Head):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


def sse(chunk: ChatCompletionChunk | CompletionChunk, include_usage: bool) -> str:
    """One server-sent event. A chat delta carries only what it has (the role first, then
    content); `usage` appears — null until the last chunk — only when the client asked."""
    data = chunk.model_dump(mode="json")
    if isinstance(chunk, ChatCompletionChunk):
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if not include_usage:
        del data["usage"]
    return f"data: {json.dumps(data)}\n\n"


