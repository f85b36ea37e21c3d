"""The public OpenAI schema: what is accepted, what is refused (400, OpenAI envelope), and
the one conversion to internal terms."""

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from pydantic import ValidationError

from specedge_gateway.openai_api import (
    MAX_STOP_CHARS,
    BodyLimit,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    openai_error_handler,
    to_generation,
    validation_error_handler,
)
from tests.templates import QWEN3_LIKE, model_dir

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def make_app() -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(OpenAIError, openai_error_handler)
    return app


def test_chat_request_converts_with_openai_defaults():
    spec = to_generation(ChatCompletionRequest(**CHAT))
    assert spec.messages == [{"role": "user", "content": "hi"}] and spec.prompt is None
    assert (spec.temperature, spec.top_p, spec.stop, spec.mode) == (1.0, 1.0, [], "specedge")
    # no seed: a fresh one per request (returned in the reply), not one seed for everyone
    seeds = {spec.seed, *(to_generation(ChatCompletionRequest(**CHAT)).seed for _ in range(5))}
    assert len(seeds) == 6 and all(0 <= seed < 2**63 for seed in seeds)
    assert to_generation(ChatCompletionRequest(**CHAT, seed=-7)).seed == -7
    assert spec.max_tokens is None and not spec.stream and not spec.include_usage


def test_max_completion_tokens_wins_and_parts_are_joined():
    spec = to_generation(ChatCompletionRequest(
        model="m", max_tokens=5, max_completion_tokens=9, stop="\n", stream=True,
        stream_options={"include_usage": True}, specedge={"mode": "server-only"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]))
    assert (spec.max_tokens, spec.stop, spec.include_usage, spec.mode) == (9, ["\n"], True, "server-only")
    assert spec.messages[0]["content"] == "ab"


def test_choices_are_prompts_times_n_seeded_one_after_another():
    assert to_generation(CompletionRequest(model="m", prompt=["x"], temperature=0)).prompt == "x"
    spec = to_generation(CompletionRequest(model="m", prompt=["x", "y"], n=3, seed=2**63 - 2))
    choices = spec.choices()
    assert [c.prompt for c in choices] == ["x", "x", "x", "y", "y", "y"]
    assert [c.seed for c in choices] == [2**63 - 2, 2**63 - 1, -(2**63)] * 2  # seed + i, wrapping as 64 bits do
    assert all(c.n == 1 and not c.more_prompts for c in choices)
    chat = to_generation(ChatCompletionRequest(**CHAT, n=2, seed=5)).choices()
    assert [c.seed for c in chat] == [5, 6] and all(c.messages == chat[0].messages for c in chat)
    with pytest.raises(ValidationError, match="at most 16 choices"):
        CompletionRequest(model="m", prompt=["x"] * 5, n=4)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, None),
        ({"specedge": {"mode": "telepathy"}}, "specedge.mode"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_invalid_requests_get_400_in_the_openai_envelope(change, param):
    app = make_app()

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest) -> dict:
        return {"ok": True}

    response = TestClient(app).post("/v1/chat/completions", json={**CHAT, **change})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] is not None and error["param"].startswith(param.split(".")[0])


def test_malformed_json_is_a_400_too():
    app = make_app()

    @app.post("/v1/completions")
    async def complete(request: CompletionRequest) -> dict:
        return {}

    response = TestClient(app).post("/v1/completions", content=b"{not json",
                                    headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**70])
def test_a_seed_beyond_64_bits_is_a_400(seed):
    app = make_app()

    @app.post("/chat")
    def chat(body: ChatCompletionRequest) -> dict:
        return {"seed": body.seed}

    client = TestClient(app)
    reply = client.post("/chat", json={**CHAT, "seed": seed})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "seed"
    assert client.post("/chat", json={**CHAT, "seed": 2**63 - 1}).json() == {"seed": 2**63 - 1}


def test_an_oversized_body_is_a_413_before_anything_reads_it():
    """By its Content-Length, and as a chunked body without one; the handler never runs."""
    from starlette.exceptions import HTTPException

    from specedge_gateway.openai_api import http_error_handler

    app = make_app()
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_middleware(BodyLimit, max_bytes=1000)
    calls = []

    @app.post("/chat")
    def chat(body: ChatCompletionRequest) -> dict:
        calls.append(body)
        return {}

    client = TestClient(app)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    reply = client.post("/chat", json=big)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"

    def chunks():
        import json

        data = json.dumps(big).encode()
        yield from (data[i:i + 100] for i in range(0, len(data), 100))

    reply = client.post("/chat", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "invalid_request_error"
    assert calls == []
    assert client.post("/chat", json=CHAT).status_code == 200 and len(calls) == 1


def test_stop_sequences_are_bounded_in_length():
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**CHAT, stop=["x" * (MAX_STOP_CHARS + 1)])
    assert ChatCompletionRequest(**CHAT, stop=["x" * MAX_STOP_CHARS]).stop == ["x" * MAX_STOP_CHARS]


def test_chat_templates_render_as_the_tokenizers_own_apply_chat_template(tmp_path):
    """Templates using transformers' helpers (`raise_exception`, `strftime_now`) work as they
    do with `apply_chat_template`; a template's refusal is a ValueError (the gateway's 400)."""
    import shutil

    from transformers import AutoTokenizer

    from specedge.models import BUNDLED_TARGET, bundled
    from specedge_gateway.text import TextCodec

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    codec = TextCodec(bundled(BUNDLED_TARGET))
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    assert codec.chat_prompt(messages) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{bundled(BUNDLED_TARGET)}/{name}", tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the user') }}{% endif %}"
        "{{ strftime_now('%Y') }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    strict = TextCodec(str(tmp_path))
    assert strict.chat_prompt([{"role": "user", "content": "x"}]).endswith("x")
    with pytest.raises(ValueError, match="the first message must be the user"):
        strict.chat_prompt(messages)


@pytest.mark.parametrize(("extra", "status", "code"), [
    ({"echo": True}, 400, "unsupported_parameter"),
    ({"response_format": {"type": "json_schema"}}, 400, "invalid_value"),
    ({"tool_choice": "required"}, 400, "invalid_value"),
    ({"best_of": 3}, 400, "unsupported_parameter"),
    ({"presence_penalty": 3}, 400, "invalid_value"),
    ({"frobnicate": 1}, 400, "unknown_parameter"),
    ({"prompt_logprobs": 1, "stream": True}, 400, None),  # vLLM's rule: not streamed
    ({"prompt_logprobs": 21}, 400, None),
    ({"echo": False, "min_tokens": 2, "best_of": 1, "response_format": {"type": "text"}, "tools": [],
      "user": "u-1", "tool_choice": "auto", "chat_template_kwargs": {"enable_thinking": False}}, 200, None),
])
def test_fields_not_served_get_a_400_naming_them_unless_they_ask_for_nothing(extra, status, code):
    from specedge_gateway.openai_api import check_fields

    app = make_app()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        check_fields(body)
        return {"ok": True}

    reply = TestClient(app).post("/v1/chat/completions", json={**CHAT, **extra})
    assert reply.status_code == status, reply.text
    if code:
        error = reply.json()["error"]
        assert error["code"] == code and error["param"] == next(iter(extra)) and error["param"] in error["message"]


def test_lenient_ignores_unknown_fields_but_still_refuses_unserved_ones():
    from specedge_gateway.openai_api import check_fields

    body = ChatCompletionRequest(**CHAT, frobnicate=1, another={"x": 1})
    assert check_fields(body, lenient=True) == ["another", "frobnicate"]
    with pytest.raises(OpenAIError, match="echo is not supported"):
        check_fields(ChatCompletionRequest(**CHAT, frobnicate=1, echo=True), lenient=True)


def test_vllms_sampling_fields_are_taken_at_the_top_level():
    spec = to_generation(ChatCompletionRequest(**CHAT, top_k=5, stop_token_ids=[7, 9], ignore_eos=True))
    assert (spec.top_k, spec.stop_token_ids, spec.ignore_eos) == (5, (7, 9), True)
    assert spec.end_ids([2, 0]) == [7, 9]  # ignore_eos drops the model's end of turn, not stop_token_ids
    assert to_generation(ChatCompletionRequest(**CHAT, stop_token_ids=[7])).end_ids([2, 0]) == [2, 0, 7]
    assert to_generation(ChatCompletionRequest(**CHAT, top_k=-1)).top_k == 0  # vLLM's "no limit"
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**CHAT, top_k=-2)
    schema = ChatCompletionRequest.model_json_schema()
    assert schema["additionalProperties"] is False and "top_k" in schema["properties"]


def test_tools_and_chat_template_kwargs_reach_the_template(tmp_path):
    from specedge_gateway.text import TextCodec

    codec = TextCodec(str(model_dir(tmp_path, QWEN3_LIKE)))
    messages = [{"role": "user", "content": "hi"}]
    assert codec.chat_prompt(messages).endswith("<|im_start|>assistant\n")
    assert codec.chat_prompt(messages, template_kwargs={"enable_thinking": False}).endswith("<think>\n\n</think>\n\n")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    assert codec.chat_prompt(messages, tools=tools).startswith("<tools>weather;</tools>")
    with pytest.raises(ValueError, match="may not set add_generation_prompt"):
        codec.chat_prompt(messages, template_kwargs={"add_generation_prompt": False})
    spec = to_generation(ChatCompletionRequest(**CHAT, tools=tools, chat_template_kwargs={"enable_thinking": False}))
    assert spec.tools == tools and spec.template_kwargs == {"enable_thinking": False}
    assert to_generation(ChatCompletionRequest(**CHAT, tools=tools, tool_choice="none")).tools is None


def test_a_tokenizer_named_by_hub_id_comes_from_the_local_cache(tmp_path, monkeypatch):
    from specedge_gateway.text import TextCodec

    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    model_dir(snapshot, QWEN3_LIKE)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert "<tools>" in TextCodec("acme/tiny")._template
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        TextCodec("acme/absent")


def cut(text: str, rng, places: int) -> list[str]:
    """`text` in pieces, cut at up to `places` random places (as a stream may deliver it)."""
    cuts = sorted(rng.sample(range(len(text) + 1), min(places, len(text) + 1)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("text", ["<think>\nplan it\n</think>\n\nanswer here", "no thinking at all",
                                  "  <think>never closed", "<thi", "<think></think>x", "a</think>b"])
def test_reasoning_is_split_from_the_answer_the_same_streamed_or_whole(text):
    import random

    from specedge_gateway.text import ReasoningSplit

    reasoning, content = ReasoningSplit().split(text)
    rng = random.Random(text)
    for _ in range(30):
        split, got = ReasoningSplit(), ["", ""]
        for piece in cut(text, rng, 3):
            for i, part in enumerate(split.add(piece)):
                got[i] += part
        for i, part in enumerate(split.flush()):
            got[i] += part
        assert got == [reasoning or "", content]
    if text.startswith("<think>\n"):
        assert (reasoning, content) == ("\nplan it\n", "\n\nanswer here")


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"structured_outputs": {"regex": "a+"}, "guided_choice": ["x"]}, "structured_outputs"),
    ({"min_tokens": 3, "guided_regex": "a+"}, "min_tokens"),
    ({"ignore_eos": True, "guided_choice": ["a", "b"]}, "ignore_eos"),
])
def test_a_structured_output_that_cannot_be_followed_is_a_400_naming_its_field(extra, param):
    from specedge_gateway.openai_api import OpenAIError, to_generation

    with pytest.raises(OpenAIError) as caught:
        to_generation(ChatCompletionRequest(**CHAT, **extra))
    assert caught.value.status == 400 and caught.value.param == param and param in caught.value.message


def test_structured_outputs_become_one_grammar():
    from specedge_gateway.openai_api import to_generation

    assert to_generation(ChatCompletionRequest(**CHAT)).grammar == ""
    assert to_generation(ChatCompletionRequest(**CHAT, response_format={"type": "text"})).grammar == ""
    for extra in ({"response_format": {"type": "json_object"}}, {"guided_choice": ["yes", "no"]},
                  {"structured_outputs": {"regex": "[0-9]+"}}, {"guided_json": {"type": "integer"}},
                  {"response_format": {"type": "json_schema",
                                       "json_schema": {"name": "n", "schema": {"type": "integer"}}}}):
        assert to_generation(ChatCompletionRequest(**CHAT, **extra)).grammar, extra


def test_forced_tool_calls_become_a_grammar_and_come_back_as_calls():
    from specedge_gateway.openai_api import OpenAIError, to_generation
    from specedge_gateway.structured import tool_calls_of

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g"}}]
    named = to_generation(ChatCompletionRequest(**CHAT, tools=tools,
                                                tool_choice={"type": "function", "function": {"name": "g"}}))
    assert named.tool_call == "g" and not named.tools_required and named.grammar
    required = to_generation(ChatCompletionRequest(**CHAT, tools=tools, tool_choice="required"))
    assert required.tools_required and required.grammar and required.tool_call == ""
    assert to_generation(ChatCompletionRequest(**CHAT, tools=tools, tool_choice="auto")).grammar == ""
    with pytest.raises(ValueError, match="not in tools"):
        ChatCompletionRequest(**CHAT, tools=tools, tool_choice={"type": "function", "function": {"name": "h"}})
    with pytest.raises(OpenAIError) as caught:
        to_generation(ChatCompletionRequest(**CHAT, tools=tools, tool_choice="required",
                                            response_format={"type": "json_object"}))
    assert caught.value.param == "tool_choice"
    assert tool_calls_of('{"x": 1}', "g", False) == [("g", '{"x": 1}')]
    assert tool_calls_of('[{"name": "f", "parameters": {"a": [1]}}]', "", True) == [("f", '{"a": [1]}')]
    assert tool_calls_of('{"x": ', "g", False) is None  # cut by max_tokens: not a call


def test_prompt_logprobs_take_vllms_shape():
    from specedge.protocol import TokenLogprob
    from specedge_gateway.responses import prompt_logprobs_of

    entries = [TokenLogprob(5, None), TokenLogprob(7, -1.0, [(3, -0.5), (7, -1.0)], 2),
               TokenLogprob(9, -4.0, [(3, -0.2), (4, -1.0)], 17)]
    shaped = prompt_logprobs_of(entries, lambda t: f"<{t}>", 1)
    assert shaped[0] is None
    assert {k: v.model_dump() for k, v in shaped[2].items()} == {
        "9": {"logprob": -4.0, "rank": 17, "decoded_token": "<9>"},
        "3": {"logprob": -0.2, "rank": 1, "decoded_token": "<3>"}}
    assert set(prompt_logprobs_of(entries, str, 2)[1]) == {"7", "3"}  # the token among the best: once
    assert prompt_logprobs_of(entries, str, -1) is None and prompt_logprobs_of(None, str, 2) is None


@pytest.mark.parametrize("text", [
    'Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": {"y": "é"}}',
    '<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>',  # not JSON: all text
    "no call at all", "ends with <tool_ca", "<tool_call>", 'a <tool_call>{"arguments": {}}</tool_call>'])
def test_the_hermes_parser_splits_the_same_streamed_or_whole(text):
    import random

    from specedge_gateway.text import HermesToolCalls

    content, calls = HermesToolCalls().split(text)
    rng = random.Random(text)
    for _ in range(30):
        parser = HermesToolCalls()
        streamed = "".join(parser.add(piece) for piece in cut(text, rng, 4))
        tail, got = parser.flush()
        assert (streamed + tail, got) == (content or "", calls)
    if text.startswith("Sure."):
        assert (content, calls) == ("Sure. ", [("f", '{"x": 1}')])
    if '"g"' in text:
        assert content is None and calls == [("f", "{}"), ("g", '{"y": "é"}')]
    if calls is None:
        assert content == text


def test_reasoning_then_tool_calls_from_one_reply():
    """Qwen3's order: it thinks, then calls; with both parsers the reply splits in three."""
    from specedge_gateway.openai_api import to_generation
    from specedge_gateway.routes import _message
    from specedge_gateway.settings import GatewaySettings

    settings = GatewaySettings(tokenizer="x", reasoning_parser="qwen3", tool_call_parser="hermes")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    text = '<think>plan</think>\n\nOk <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    message = _message(text, settings, to_generation(ChatCompletionRequest(**CHAT, tools=tools)))
    assert (message.reasoning_content, message.content) == ("plan", "\n\nOk ")
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("f", '{"a": 1}')]
    unparsed = _message(text, settings, to_generation(ChatCompletionRequest(**CHAT, tools=tools, tool_choice="none")))
    assert unparsed.tool_calls is None and "<tool_call>" in unparsed.content
