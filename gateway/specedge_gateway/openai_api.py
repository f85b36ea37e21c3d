"""The public OpenAI-compatible schema, its errors, and the one conversion to internal terms.

Owns what a client may send to `/v1/chat/completions` and `/v1/completions`, how a bad
request is answered (HTTP 400 with OpenAI's error envelope, never FastAPI's 422), and
`to_generation()`, the single function that turns a public request into the gateway's
internal `GenerationSpec`. It knows nothing about sessions, NATS or tokenizers.

SpecEdge extension: a request may carry `"specedge": {"mode": "server-only"}` (with the
`openai` client: `extra_body={"specedge": {...}}`) to choose how it is decoded.

Fields: what the schema declares is served (`logprobs`/`top_logprobs`: the target's raw
log-probabilities; vLLM's `prompt_logprobs`, the prompt's with ranks; structured outputs —
`response_format` and vLLM's guided fields (`structured`); `presence_penalty`,
`frequency_penalty`, `logit_bias`; `tools` and vLLM's `chat_template_kwargs`, given to the
chat template; vLLM's `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids` and
`ignore_eos` at the top level of the body, as vLLM takes them — each penalty over a tree
node's own path, so speculation changes nothing); a field of OpenAI's or vLLM's API that
SpecEdge does not serve (`UNSUPPORTED`) is a 400 naming it — unless its value asks for
nothing (`logprobs: false`, a penalty of 0); a field nobody knows is a 400 as OpenAI's own
API answers, or, with the gateway's `--lenient`, ignored with a warning (vLLM's
behaviour). `check_fields` decides, after the schema's own checks.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from specedge.protocol import MAX_LOGPROBS, Mode
from specedge_gateway.structured import StructuredFields, StructuredOutputError, grammar_of, tool_call_grammar

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # n, and prompts × n on /v1/completions
MAX_STOP_CHARS = 256  # each stop sequence is matched against the text as it streams
MAX_CHARS_PER_TOKEN = 64  # a prompt longer than max_context × this cannot fit: refused before tokenizing


class OpenAIError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending parameter."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    return error_response(400, message, param=param, code="invalid_value")


async def openai_error_handler(request: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The framework's own errors — a body it cannot parse, an unknown path or method — in
    OpenAI's envelope too, never FastAPI's `{"detail": …}`."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    response = error_response(exc.status_code, str(exc.detail),
                              "server_error" if exc.status_code >= 500 else "invalid_request_error",
                              code=codes.get(exc.status_code))
    response.headers.update(exc.headers or {})
    return response


class SpecEdgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = "specedge"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# Fields of OpenAI's and vLLM's APIs that SpecEdge does not serve: refused (400) unless their
# value asks for nothing (`_asks_nothing`).
UNSUPPORTED = frozenset({
    "echo", "functions", "function_call", "best_of", "suffix",
    "use_beam_search", "length_penalty", "chat_template",
    "add_generation_prompt", "continue_final_message", "reasoning_effort", "modalities",
    "audio", "prediction", "web_search_options", "include_stop_str_in_output", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "bad_words", "allowed_token_ids",
})
# Fields that change nothing about the output: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "priority", "request_id"})


def _asks_nothing(name: str, value: object) -> bool:
    """Whether a value of an unsupported field leaves the output as it is without it."""
    if value is None or value is False or value == 0 or value == [] or value == {} or value == "":
        return True
    neutral = {"repetition_penalty": 1, "length_penalty": 1, "skip_special_tokens": True,
               "spaces_between_special_tokens": True, "add_generation_prompt": True, "tool_choice": "none",
               "best_of": 1}
    return name in neutral and value == neutral[name]


def check_fields(request: BaseModel, lenient: bool = False) -> list[str]:
    """Refuse what the request asks for and SpecEdge does not serve; returns the unknown
    fields ignored under `lenient` (the caller warns)."""
    ignored = []
    for name, value in sorted((request.model_extra or {}).items()):
        if name in IGNORED:
            continue
        if name in UNSUPPORTED:
            if not _asks_nothing(name, value):
                raise OpenAIError(400, f"{name} is not supported by SpecEdge", param=name, code="unsupported_parameter")
        elif lenient:
            ignored.append(name)
        else:
            raise OpenAIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                              code="unknown_parameter")
    return ignored


class _SamplingFields(StructuredFields):
    """Fields both endpoints share. Others are kept aside for `check_fields` (and the
    published schema forbids them)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # OpenAI's range: a 64-bit integer
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # parallel sessions, the i-th seeded seed + i
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM's: -1 or 0 is no limit
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0  # vLLM's
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0  # vLLM's
    min_tokens: Annotated[int, Field(ge=0)] = 0  # vLLM's: no end of turn or stop token before this many
    logit_bias: Annotated[dict[int, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] | None = None  # vLLM's
    ignore_eos: bool = False  # vLLM's: generate up to max_tokens whatever the model's end-of-turn
    # vLLM's: each prompt token's raw logprob, rank and this many alternatives (not streamed)
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    specedge: SpecEdgeOptions = Field(default_factory=SpecEdgeOptions)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _usage_needs_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.stream and self.prompt_logprobs:  # vLLM's rule (and its words): 0 asks for nothing to stream
            raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
        return self


class Tool(BaseModel):
    """A tool the chat template shows the model (with `tool_choice` `auto`, a call comes back as
    text, or as `tool_calls` under the gateway's `--tool-call-parser`; `required` or a named
    function: as `tool_calls`, by a grammar)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: dict[str, Any]

    @field_validator("function")
    @classmethod
    def _named(cls, function: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError("a function needs a name")
        return function

    @property
    def name(self) -> str:
        return self.function["name"]


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice` naming the function the reply must call."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None  # passed to the chat template
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: `required` makes one call at most
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=32)] | None = None  # e.g. enable_thinking
    logprobs: bool = False  # each token's raw logprob (the target's, before temperature)
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _forced_tools_exist(cls, choice: object, info: ValidationInfo) -> object:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            names = [t.name for t in info.data.get("tools") or []]
            if not names:
                raise ValueError("tool_choice required or a named function needs tools")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        return choice

    def forced_tools(self) -> tuple[list[dict[str, Any]], bool]:
        """The functions the reply must call (`tool_choice` required: one or more of them;
        a named function: that one), and whether it is a choice among them; none otherwise."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t.function for t in self.tools if t.name == self.tool_choice.function.name][:1], False
        if self.tool_choice == "required":
            return [t.function for t in self.tools], True
        return [], False


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    # text, a list of texts, token ids, or a list of token-id lists (OpenAI's four forms)
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | TokenIds \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # each token's, and this many alternatives
    echo: bool = False  # the prompt before the completion (with `logprobs`: the target's of each prompt token)

    def prompts(self) -> list[str | tuple[int, ...]]:
        """Each prompt: a text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [tuple(self.prompt)]
        return [p if isinstance(p, str) else tuple(p) for p in self.prompt]

    @model_validator(mode="after")
    def _few_choices(self) -> CompletionRequest:
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices (prompts × n) per request")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a prompt, or chat messages (through the chat template)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's `/detokenize`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1_000_000)


@dataclass(frozen=True)
class GenerationSpec:
    """A request in the gateway's own terms (what the session machinery needs)."""

    model: str
    messages: list[dict[str, str]] | None   # chat: apply the chat template
    prompt: str | tuple[int, ...] | None    # completions: the raw prompt, or its token ids (of the first choice)
    max_tokens: int | None                  # None: up to the context limit
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    mode: Mode
    top_k: int = 0  # 0: no limit
    stop_token_ids: tuple[int, ...] = ()  # end the output like the end-of-turn tokens do (it holds the
    # stop token unless that is a special token, as vLLM documents)
    ignore_eos: bool = False

    logprobs: int = -1  # -1: none; k >= 0: each token's logprob and its k best alternatives
    n: int = 1  # choices per prompt
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    tools: list[dict] | None = None  # chat: shown to the model by its chat template
    template_kwargs: dict | None = None  # chat: the template's own variables
    more_prompts: tuple[str | tuple[int, ...], ...] = ()  # completions: the prompts after the first
    grammar: str = ""  # a structured output's llguidance grammar (`structured.grammar_of`)
    tool_call: str = ""  # chat: the function the reply must call ("" none); with `tools_required` any of them
    tools_required: bool = False
    echo: bool = False  # completions: the prompt first (its tokens' logprobs too, when asked)
    prompt_logprobs: int = -1  # vLLM's field: -1 none; k >= 0 each prompt token's logprob, rank and k best

    def choices(self) -> list[GenerationSpec]:
        """One spec per choice, in the order of their `index`: prompt by prompt, `n` each, the
        i-th of a prompt's seeded `seed + i` (so a seeded request is reproducible choice by choice)."""
        prompts = [self.prompt, *self.more_prompts] if self.prompt is not None else [None]
        return [dataclasses.replace(self, prompt=prompt, more_prompts=(), n=1,
                                    seed=(self.seed + i + 2**63) % 2**64 - 2**63)
                for prompt in prompts for i in range(self.n)]

    def end_ids(self, eos_ids: list[int]) -> list[int]:
        """The tokens that end the output: the model's end-of-turn ids (none with
        `ignore_eos`) and the request's `stop_token_ids` (which `ignore_eos` spares, as in vLLM)."""
        return [*([] if self.ignore_eos else eos_ids), *self.stop_token_ids]


def to_generation(request: ChatCompletionRequest | CompletionRequest) -> GenerationSpec:
    """The one conversion from the public schema to internal terms."""
    if isinstance(request, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt = None
        max_tokens = request.max_completion_tokens or request.max_tokens
        tools = [t.model_dump() for t in request.tools] if request.tools and request.tool_choice != "none" else None
        template_kwargs = request.chat_template_kwargs
        forced = request.forced_tools()
    else:
        prompts = request.prompts()
        messages, prompt, max_tokens = None, prompts[0], request.max_tokens
        tools = template_kwargs = None
        forced = [], False
    return GenerationSpec(
        model=request.model,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=secrets.randbits(63) if request.seed is None else request.seed,  # fresh per request, returned
        stop=list(request.stop or []),
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        mode=request.specedge.mode,
        top_k=max(0, request.top_k or 0),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        n=request.n,
        more_prompts=tuple(prompts[1:]) if messages is None else (),
        logprobs=_logprobs(request),
        prompt_logprobs=-1 if request.prompt_logprobs is None or request.stream else request.prompt_logprobs,
        min_p=request.min_p, presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty, logit_bias=tuple(sorted((request.logit_bias or {}).items())),
        tools=tools, template_kwargs=template_kwargs, min_tokens=request.min_tokens,
        grammar=_grammar(request, *forced), echo=getattr(request, "echo", False), **_tool_call(*forced),
    )


def _tool_call(functions: list[dict[str, Any]], choice: bool) -> dict[str, Any]:
    """A forced tool call's `GenerationSpec` fields (`forced_tools()`'s answer in)."""
    if not functions:
        return {}
    return {"tool_call": "" if choice else functions[0]["name"], "tools_required": choice}


def _grammar(request: ChatCompletionRequest | CompletionRequest, functions: list[dict[str, Any]],
             choice: bool) -> str:
    """The request's structured output or forced tool call (`functions`, `choice`: what
    `forced_tools()` says) as one grammar; a 400 when it cannot be followed."""
    try:
        grammar = grammar_of(request)
        if functions:
            if grammar:
                raise StructuredOutputError("tool_choice", "a forced tool call cannot be combined with another "
                                            "structured output")
            grammar = tool_call_grammar(functions, choice, request.parallel_tool_calls is not False)
    except StructuredOutputError as exc:
        raise OpenAIError(400, str(exc), param=exc.param, code="invalid_value") from exc
    for name, asked in (("min_tokens", request.min_tokens), ("ignore_eos", request.ignore_eos)):
        if grammar and asked:  # a grammar complete before then would leave nothing it allows to draw
            raise OpenAIError(400, f"{name} cannot be combined with a structured output", param=name,
                              code="invalid_value")
    return grammar


def _logprobs(request: ChatCompletionRequest | CompletionRequest) -> int:
    if isinstance(request, ChatCompletionRequest):
        return (request.top_logprobs or 0) if request.logprobs else -1
    return -1 if request.logprobs is None else request.logprobs


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 in OpenAI's envelope — by
    its Content-Length before anything is read, or as soon as a chunked body passes the
    limit — so no handler, not even the API key check, parses an oversized body."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes / 2**20:g} MiB"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["received"] = time.monotonic()  # latencies count from here (`received`)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await error_response(413, self._too_large(), code="request_too_large")(scope, receive, send)
            return
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # the route's body reading turns this into the 413 reply
                raise StarletteHTTPException(413, self._too_large())
            return message

        await self.app(scope, limited, send)


def received(request: Request) -> float:
    """When the request reached the gateway (`BodyLimit` stamps it; now, without it): its
    time to first token and end-to-end latency count from here, as a client measures them."""
    return getattr(request.state, "received", None) or time.monotonic()
