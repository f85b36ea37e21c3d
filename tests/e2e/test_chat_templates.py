"""Chat templates as a model ships them, through the whole stack: `specedge up` whose
gateway reads a model folder with a Qwen3-like template (`--tokenizer`), with
`--reasoning-parser qwen3` and `--tool-call-parser hermes`. The reply to a chat with
`tools` and `chat_template_kwargs` is the target's own continuation of the prompt that
`transformers` renders from that template; a reply that thinks comes back split into
`reasoning_content` and `content`, exactly as the target alone writes it, in every mode;
a structured output holds after the reasoning, as vLLM holds one."""

import dataclasses

import llguidance
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge.engine.sampling import SamplingSpec
from specedge.models import BUNDLED_TARGET, bundled
from specedge_gateway.structured import JSON_LAYOUT, after_thinking
from specedge_gateway.text import ReasoningSplit
from tests.e2e.test_openai_api import Gateway
from tests.helpers import specedge_up
from tests.structured import reference_output
from tests.templates import QWEN3_LIKE, model_dir

pytestmark = pytest.mark.e2e
MODES = ("specedge", "server-only", "autoregressive")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    folder = model_dir(tmp_path_factory.mktemp("models") / BUNDLED_TARGET, QWEN3_LIKE)  # served under the same name
    env = {"SPECEDGE_TOKENIZER": str(folder), "SPECEDGE_REASONING_PARSER": "qwen3",
           "SPECEDGE_TOOL_CALL_PARSER": "hermes"}
    with specedge_up("--edges", "1", env=env) as stack:
        yield Gateway(**dataclasses.asdict(stack))


@pytest.fixture(scope="module")
def target():
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()

    def prompt(messages: list[dict], **kwargs) -> list[int]:
        text = tok.apply_chat_template(messages, chat_template=QWEN3_LIKE, add_generation_prompt=True,
                                       tokenize=False, **kwargs)
        return tok(text, add_special_tokens=False)["input_ids"]

    return tok, model, prompt


def test_tools_and_template_kwargs_shape_the_prompt_the_target_continues(gateway, target):
    tok, model, prompt = target
    messages = [{"role": "user", "content": "What is the weather?"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    ids = prompt(messages, tools=tools, enable_thinking=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8)[0, len(ids):]
    client = gateway.client()
    for mode in MODES:
        reply = client.chat.completions.create(model=BUNDLED_TARGET, messages=messages, tools=tools, temperature=0,
                                               max_tokens=8, extra_body={"chat_template_kwargs": {
                                                   "enable_thinking": False}, "specedge": {"mode": mode}})
        assert reply.usage.prompt_tokens == len(ids), mode
        assert reply.choices[0].message.content == tok.decode(out, skip_special_tokens=True), mode
    plain = client.chat.completions.create(model=BUNDLED_TARGET, messages=messages, temperature=0, max_tokens=1)
    assert plain.usage.prompt_tokens == len(prompt(messages))  # no tools, no empty think block


def test_a_reply_that_thinks_comes_back_as_reasoning_and_content(gateway, target):
    """The tiny model thinks only when a regex makes it. The prompt closes the reasoning
    (`enable_thinking: false`), so the regex holds from the first token, as in vLLM: it fixes
    the form, the target writes the words — exactly as it alone would under that regex."""
    tok, model, prompt = target
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    regex = r"<think>[a-z ]{1,24}</think>\n\n[A-Za-z ]{1,24}"
    expected = reference_output(model, tok, prompt(messages, enable_thinking=False), SamplingSpec(
        grammar=llguidance.LLMatcher.grammar_from_regex(regex)), 64, list(model.generation_config.eos_token_id))
    reasoning, content = ReasoningSplit().split(tok.decode(expected, skip_special_tokens=True))
    assert reasoning and content
    client = gateway.client()
    ask = {"model": BUNDLED_TARGET, "messages": messages, "temperature": 0, "max_tokens": 64}
    extra = {"guided_regex": regex, "chat_template_kwargs": {"enable_thinking": False}}
    for mode in MODES:
        message = client.chat.completions.create(**ask, extra_body={**extra, "specedge": {"mode": mode}}
                                                 ).choices[0].message
        assert (message.reasoning_content, message.content) == (reasoning, content), mode
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True, extra_body=extra)
              if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning  # (an extra field)
    assert "".join(d.content or "" for d in deltas) == content


def test_a_structured_output_holds_after_the_reasoning(gateway, target):
    """With the reasoning parser a structured output holds from the end of the reasoning on:
    the reply may think freely first (the tiny model rambles on in its thoughts) unless the
    prompt has closed the reasoning (`enable_thinking: false`: the grammar holds at once and
    the answer validates). Either way the output is what the target alone draws under that
    grammar, in every mode; a forced tool call the same."""
    import json

    import jsonschema

    tok, model, prompt = target
    schema = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 12}}}
    plain = llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_LAYOUT)
    messages = [{"role": "user", "content": "Name a city as JSON."}]
    ends = list(model.generation_config.eos_token_id)
    client = gateway.client()
    ask = {"model": BUNDLED_TARGET, "messages": messages, "temperature": 0, "max_tokens": 40,
           "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}}
    for thinking, grammar in ((True, after_thinking(plain)), (False, plain)):
        expected = reference_output(model, tok, prompt(messages, enable_thinking=thinking),
                                    SamplingSpec(grammar=grammar), 40, ends)
        reasoning, content = ReasoningSplit().split(tok.decode(expected, skip_special_tokens=True))
        if not thinking:
            assert reasoning is None
            jsonschema.validate(json.loads(content), schema)
        for mode in MODES:
            message = client.chat.completions.create(**ask, extra_body={
                "chat_template_kwargs": {"enable_thinking": thinking}, "specedge": {"mode": mode}}).choices[0].message
            assert (message.reasoning_content, message.content) == (reasoning, content), (thinking, mode)
    forced = {**{k: v for k, v in ask.items() if k != "response_format"}, "extra_body": {
        "chat_template_kwargs": {"enable_thinking": False}}, "tool_choice": {"type": "function", "function": {
            "name": "city"}}, "tools": [{"type": "function", "function": {"name": "city", "parameters": schema}}]}
    called = client.chat.completions.create(**forced)
    arguments = called.choices[0].message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(arguments), schema)
    chunks = client.chat.completions.create(**forced, stream=True)
    assert [c.function.arguments for chunk in chunks for choice in chunk.choices
            for c in choice.delta.tool_calls or []] == [arguments]
