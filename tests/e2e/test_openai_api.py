"""The stack through its public API with the official `openai` client: exact greedy output,
streaming and not, concurrent clients, multi-turn, every mode, API keys, and OpenAI-style errors."""

import asyncio
import dataclasses
import re
import subprocess

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge.models import BUNDLED_TARGET, bundled, chat_prompt_ids
from tests.conftest import SPECEDGE
from tests.helpers import Stack, specedge_up
from tests.sessions import prompt_and_reference

pytestmark = pytest.mark.e2e
MODEL = "specedge-tiny-target"


@dataclasses.dataclass
class Gateway(Stack):
    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0)


@pytest.fixture(scope="module")
def gateway():
    with specedge_up(env={"SPECEDGE_TOOL_CALL_PARSER": "hermes"}) as stack:
        yield Gateway(**dataclasses.asdict(stack))


@pytest.fixture(scope="module")
def reference():
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()

    def greedy(messages: list[dict], max_tokens: int) -> str:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(ids, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_tokens)[0, len(ids):]
        return tok.decode(out, skip_special_tokens=True)

    return greedy


def speculation(reply, mode: str) -> dict:
    """The `specedge` extension field of a non-streaming reply, checked for consistency."""
    stats = reply.model_extra["specedge"]
    assert stats == reply.to_dict()["specedge"]
    tokens = reply.usage.completion_tokens
    assert stats["mode"] == mode
    assert stats["drafts"] + stats["server_steps"] == stats["verifications"] >= 1
    assert 0 <= stats["accepted_tokens"] <= stats["draft_tokens"]
    # every verification commits its accepted tokens and a bonus; the last one may be cut short
    assert stats["verifications"] <= tokens <= stats["verifications"] + stats["accepted_tokens"]
    assert stats["tokens_per_verification"] == round(1 + stats["accepted_tokens"] / stats["verifications"], 4)
    # which engine served it: `specedge up`'s default, exact, in float32 on this CPU
    assert reply.system_fingerprint == "specedge-exact-float32"
    assert stats["engine"] == "exact-float32" and stats["exact"] is True
    assert isinstance(stats["seed"], int)  # drawn fresh when the request gave none: reproduces the reply
    return stats


def test_non_streaming_and_streaming_chat_equal_the_target_alone(gateway, reference):
    client = gateway.client()
    messages = [{"role": "user", "content": "Write a function that reverses a string."}]
    expected = reference(messages, 40)
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens <= 40 and reply.choices[0].finish_reason in ("length", "stop")
    stats = speculation(reply, "specedge")
    assert stats["drafts"] >= 1 and stats["draft_tokens"] > 0 and stats["acceptance_rate"] is not None
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert {c.system_fingerprint for c in chunks} == {"specedge-exact-float32"}
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed, not one burst


def test_completions_and_multi_turn(gateway, reference):
    client = gateway.client()
    done = client.completions.create(model=MODEL, prompt="def add(a, b):", temperature=0, max_tokens=16)
    assert done.choices[0].text and done.object == "text_completion"
    turns = [{"role": "user", "content": "Sort a list."}]
    first = client.chat.completions.create(model=MODEL, messages=turns, temperature=0, max_tokens=24)
    turns += [{"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "Now in reverse."}]
    second = client.chat.completions.create(model=MODEL, messages=turns, temperature=0, max_tokens=24)
    assert second.choices[0].message.content == reference(turns, 24)


def test_eight_concurrent_streaming_clients(gateway, reference):
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.key, max_retries=0)
    questions = [f"Write a function number {i} that parses a line." for i in range(8)]

    async def ask(q: str) -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                      temperature=0, max_tokens=24, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        return await asyncio.gather(*(ask(q) for q in questions))

    answers = asyncio.run(all_of_them())
    assert answers == [reference([{"role": "user", "content": q}], 24) for q in questions]


@pytest.mark.parametrize(
    ("change", "status"),
    [({"n": 17}, 400), ({"temperature": 9}, 400), ({"model": "gpt-9"}, 404), ({"messages": []}, 400),
     ({"seed": 2**64}, 400), ({"stop": ["x" * 1000]}, 400),
     ({"messages": [{"role": "user", "content": "x" * 300_000}]}, 400),  # cannot fit: refused untokenized
     ({"messages": [{"role": "user", "content": "x" * 5_000_000}]}, 413)],  # over --max-body-mib (4)
)
def test_invalid_requests_get_openai_errors(gateway, change, status):
    client = gateway.client()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**body)
    assert err.value.status_code == status
    assert set(err.value.body) >= {"message", "type", "param", "code"}


@pytest.mark.parametrize("mode", ["server-only", "autoregressive"])
def test_every_mode_gives_the_same_exact_text(gateway, reference, mode):
    messages = [{"role": "user", "content": "Count the words in a sentence."}]
    reply = gateway.client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32,
                                                     extra_body={"specedge": {"mode": mode}})
    assert reply.choices[0].message.content == reference(messages, 32)
    stats = speculation(reply, mode)
    if mode == "autoregressive":  # one verified token per step, nothing drafted
        assert stats["server_steps"] == stats["verifications"] == reply.usage.completion_tokens
        assert stats["draft_tokens"] == 0 and stats["acceptance_rate"] is None
    else:  # the server drafter drafts the trees
        assert stats["drafts"] >= 1 and stats["draft_tokens"] > 0


def test_api_keys_are_required_created_listed_and_revoked(gateway, cli_env):
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for key in ("sk-wrong-key-0000000000", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=ask, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text

    def keys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SPECEDGE, "keys", *args, "--redis-url", gateway.redis_url], env=cli_env,
                              capture_output=True, text=True, timeout=60)

    created = keys("create", "--user", "bob", "--label", "laptop")
    assert created.returncode == 0, created.stderr
    bob = created.stdout.strip()
    assert gateway.client(bob).chat.completions.create(**ask).choices[0].message.content is not None
    listed = keys("list")
    assert "bob" in listed.stdout and "laptop" in listed.stdout and bob not in listed.stdout  # stored hashed
    assert keys("revoke", bob).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        gateway.client(bob).chat.completions.create(**ask)
    assert keys("revoke", bob).returncode == 1  # already gone


def test_vllms_sampling_fields_are_served_exactly_and_unserved_fields_refused(gateway, reference):
    client = gateway.client()
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    messages = [{"role": "user", "content": "Name three colors."}]
    ask = {"model": MODEL, "messages": messages, "temperature": 0.9, "seed": 11, "max_tokens": 24}

    def text(extra: dict, **change) -> tuple[str, object]:
        reply = client.chat.completions.create(**{**ask, **change}, extra_body=extra)
        return reply.choices[0].message.content, reply

    # top_k: speculation draws exactly what the target alone draws (mode autoregressive)
    spec, _ = text({"top_k": 5})
    alone, _ = text({"top_k": 5, "specedge": {"mode": "autoregressive"}})
    assert spec == alone
    assert text({"top_k": 1})[0] == reference(messages, 24)  # one candidate: greedy
    # stop_token_ids end the output at that token, like the end of a turn; as vLLM documents, the
    # output holds the stop token unless it is a special token
    _, ids, _ = prompt_and_reference("Name three colors.", 24)  # the target's own greedy ids
    cut, reply = text({"stop_token_ids": [ids[4]]}, temperature=0)
    assert cut == tok.decode(ids[:ids.index(ids[4]) + 1], skip_special_tokens=True)  # at its first occurrence
    assert reply.choices[0].finish_reason == "stop"
    # min_tokens keeps it (and the end of turn) out until the output is long enough — exactly as alone
    late, reply = text({"stop_token_ids": [ids[4]], "min_tokens": 6}, temperature=0)
    alone, _ = text({"stop_token_ids": [ids[4]], "min_tokens": 6, "specedge": {"mode": "autoregressive"}},
                    temperature=0)
    assert late == alone and reply.usage.completion_tokens >= 6
    # ignore_eos: generation runs to max_tokens, exactly as the target alone runs on (the bundled
    # target seldom ends a turn early: which tokens end it is `test_vllms_sampling_fields_…` in the unit tests)
    short = [{"role": "user", "content": "Say yes."}]
    long_spec = client.chat.completions.create(model=MODEL, messages=short, temperature=0, max_tokens=48,
                                               extra_body={"ignore_eos": True})
    long_alone = client.chat.completions.create(model=MODEL, messages=short, temperature=0, max_tokens=48,
                                                extra_body={"ignore_eos": True, "specedge": {"mode": "autoregressive"}})
    assert long_spec.usage.completion_tokens == 48 and long_spec.choices[0].finish_reason == "length"
    assert long_spec.choices[0].message.content == long_alone.choices[0].message.content
    # what SpecEdge does not serve, and what nobody knows: a 400 naming the field
    for extra, code in (({"echo": True}, "unsupported_parameter"), ({"frobnicate": 1}, "unknown_parameter")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=extra)
        assert err.value.body["code"] == code and err.value.body["param"] == next(iter(extra))


def test_tokenize_and_detokenize_as_vllm_has_them(gateway):
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    headers = {"Authorization": f"Bearer {gateway.key}"}
    reply = httpx.post(f"{gateway.url}/tokenize", json={"model": MODEL, "prompt": "def f(x): return x"},
                       headers=headers, timeout=30).json()
    assert reply["tokens"] == tok("def f(x): return x", add_special_tokens=False)["input_ids"]
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] > 0
    chat = httpx.post(f"{gateway.url}/tokenize", headers=headers, timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
    text = httpx.post(f"{gateway.url}/detokenize", json={"tokens": reply["tokens"]}, headers=headers, timeout=30)
    assert text.json() == {"prompt": "def f(x): return x"}
    bad = httpx.post(f"{gateway.url}/detokenize", json={"tokens": [10**9]}, headers=headers, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{gateway.url}/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401


def test_n_choices_and_prompt_lists_are_parallel_sessions_each_exact(gateway, reference):
    client = gateway.client()
    messages = [{"role": "user", "content": "Name three colors."}]
    greedy = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {reference(messages, 16)}
    assert greedy.usage.completion_tokens == 3 * 16 and greedy.usage.prompt_tokens < 3 * 16
    # seeded: choice i is the request with seed + i
    sampled = client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, seed=40, max_tokens=16,
                                             n=2)
    alone = [client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, seed=40 + i,
                                            max_tokens=16).choices[0].message.content for i in range(2)]
    assert [c.message.content for c in sampled.choices] == alone
    # streamed: every chunk names its choice; each choice's text is the same as the unstreamed one
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, seed=40, max_tokens=16,
                                            n=2, stream=True, stream_options={"include_usage": True})
    texts, finished, usage = ["", ""], set(), None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert texts == alone and finished == {0, 1} and usage.completion_tokens == 32
    # completions: a list of prompts, n each, index = prompt × n + i
    listed = client.completions.create(model=MODEL, prompt=["def add(a, b):", "import os"], temperature=0,
                                       max_tokens=8, n=2)
    assert [c.index for c in listed.choices] == [0, 1, 2, 3]
    one = [client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=8).choices[0].text
           for p in ("def add(a, b):", "import os")]
    assert [c.text for c in listed.choices] == [one[0], one[0], one[1], one[1]]


@pytest.mark.parametrize("mode", ["specedge", "server-only", "autoregressive"])
def test_logprobs_are_the_targets_own_in_every_mode_streamed_or_not(gateway, mode):
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    question = "Explain what a hash map is."
    prompt, ids, _ = prompt_and_reference(question, 16)
    with torch.no_grad():  # the target alone, one pass over prompt and output: its raw log-softmax
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    expected = torch.log_softmax(logits, -1)
    client = gateway.client()
    ask = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 16,
           "logprobs": True, "top_logprobs": 3, "extra_body": {"specedge": {"mode": mode}}}
    reply = client.chat.completions.create(**ask)
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([i]) for i in ids]
    for k, (entry, token) in enumerate(zip(content, ids, strict=True)):
        assert abs(entry.logprob - expected[k, token].item()) < 1e-4, k
        best = expected[k].topk(3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in best.indices.tolist()]
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, best.values.tolist(), strict=True))
    streamed = [c for chunk in client.chat.completions.create(**ask, stream=True) for choice in chunk.choices
                if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, round(c.logprob, 4)) for c in streamed] == [(c.token, round(c.logprob, 4)) for c in content]
    if mode == "specedge":  # the legacy shape on /v1/completions
        text = tok.decode(prompt)
        completion = client.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=16, logprobs=2)
        lp = completion.choices[0].logprobs
        assert lp.tokens == [tok.decode([i]) for i in ids] and len(lp.top_logprobs[0]) == 2
        assert all(abs(a - expected[k, t].item()) < 1e-4 for k, (a, t) in enumerate(zip(lp.token_logprobs, ids,
                                                                                          strict=True)))
        assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    plain = client.chat.completions.create(model=MODEL, messages=ask["messages"], temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_penalties_and_bias_are_applied_per_path_and_stay_exact(gateway):
    import collections

    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    question = "Explain what a hash map is."
    prompt, plain, _ = prompt_and_reference(question, 24)
    rep, freq, pres, bias = 1.3, 0.4, 0.3, {plain[0]: -3.0}

    out: list[int] = []  # the target alone, with vLLM's rules written out here
    with torch.no_grad():
        for _ in range(24):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
            for t, b in bias.items():
                logits[t] += b
            for t in sorted({*prompt, *out}):
                logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
            for t, c in collections.Counter(out).items():
                logits[t] -= freq * c + pres
            out.append(int(logits.argmax()))
    assert out != plain  # the penalties change the output
    client = gateway.client()
    ask = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
           "presence_penalty": pres, "frequency_penalty": freq, "logit_bias": {str(t): b for t, b in bias.items()}}
    for mode in ("specedge", "server-only", "autoregressive"):
        reply = client.chat.completions.create(**ask, temperature=0, extra_body={
            "repetition_penalty": rep, "specedge": {"mode": mode}})
        assert reply.choices[0].message.content == tok.decode(out, skip_special_tokens=True), mode
    sampled = {mode: client.chat.completions.create(**ask, temperature=0.9, seed=3, extra_body={
        "repetition_penalty": rep, "min_p": 0.05, "specedge": {"mode": mode}}).choices[0].message.content
        for mode in ("specedge", "autoregressive")}
    assert sampled["specedge"] == sampled["autoregressive"]


def test_tools_and_chat_template_kwargs_go_to_the_template(gateway, reference):
    client = gateway.client()
    messages = [{"role": "user", "content": "What is the weather?"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, tools=tools,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.choices[0].message.content == reference(messages, 8)  # the bundled template shows neither
    with pytest.raises(openai.BadRequestError) as err:  # a call forced with no tools to call
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, tool_choice="required")
    assert err.value.body["param"] == "tool_choice"


def test_a_forced_tool_call_comes_back_as_tool_calls_exactly_in_every_mode(gateway):
    """`tool_choice` naming a function: its arguments are what the target alone draws under
    the grammar of its `parameters` (every mode, streamed or not), valid JSON of that schema;
    `required`: one or more calls, each of a given function with valid arguments."""
    import json

    import jsonschema
    import llguidance

    from specedge.engine.sampling import SamplingSpec
    from tests.structured import LAYOUT, reference_output

    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    weather = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
               "properties": {"city": {"type": "string", "maxLength": 10},
                              "unit": {"enum": ["celsius", "fahrenheit"]}}}
    add = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
           "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                          "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}},
             {"type": "function", "function": {"name": "add", "parameters": add}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    ends = list(model.generation_config.eos_token_id)
    expected = reference_output(model, tok, prompt, SamplingSpec(
        grammar=llguidance.LLMatcher.grammar_from_json_schema(weather, LAYOUT)), 60, ends)
    assert expected[-1] in ends
    arguments = tok.decode(expected, skip_special_tokens=True)
    jsonschema.validate(json.loads(arguments), weather)
    client = gateway.client()
    named = {"type": "function", "function": {"name": "get_weather"}}
    for mode in ("specedge", "server-only", "autoregressive"):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=named,
                                               temperature=0, max_tokens=60, extra_body={"specedge": {"mode": mode}})
        message = reply.choices[0].message
        assert message.content is None and reply.choices[0].finish_reason == "stop"
        assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_weather", arguments)]
        assert message.tool_calls[0].id.startswith("call_")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=named,
                                                 temperature=0, max_tokens=60, stream=True))
    calls = [c for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [(0, "get_weather", arguments)]
    assert not any(choice.delta.content for chunk in chunks for choice in chunk.choices)
    required = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                              parallel_tool_calls=False, temperature=0.8, seed=3, max_tokens=120)
    assert required.choices[0].finish_reason == "tool_calls" and len(required.choices[0].message.tool_calls) == 1
    schemas = {"get_weather": weather, "add": add}
    for call in required.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_the_hermes_parser_returns_the_calls_a_reply_writes(gateway):
    """This module's gateway runs `--tool-call-parser hermes`: with tools and `tool_choice`
    `auto`, the `<tool_call>` blocks a reply writes come back as `tool_calls` (the text
    before them as content, finish_reason `tool_calls`), streamed or not, in every mode.
    The tiny model writes such a block only when a regex makes it: the regex fixes the form,
    the target chooses the city — exactly as it alone would under that regex."""
    import json

    import llguidance

    from specedge.engine.sampling import SamplingSpec
    from specedge_gateway.text import HermesToolCalls
    from tests.structured import reference_output

    regex = r'Checking\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome|Oslo)"\}\}</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What is the weather like?"}]
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    prompt = tok(tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    expected = reference_output(model, tok, prompt, SamplingSpec(grammar=llguidance.LLMatcher.grammar_from_regex(
        regex)), 96, list(model.generation_config.eos_token_id))
    content, calls = HermesToolCalls().split(tok.decode(expected, skip_special_tokens=True))
    assert content == "Checking. " and calls[0][0] == "get_weather"
    client = gateway.client()
    ask = {"model": MODEL, "messages": messages, "tools": tools, "temperature": 0, "max_tokens": 96}
    for mode in ("specedge", "server-only", "autoregressive"):
        reply = client.chat.completions.create(**ask, extra_body={"guided_regex": regex, "specedge": {"mode": mode}})
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == content, mode
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == calls, mode
    chunks = list(client.chat.completions.create(**ask, stream=True, extra_body={"guided_regex": regex}))
    deltas = [choice.delta for chunk in chunks for choice in chunk.choices]
    assert "".join(d.content or "" for d in deltas) == content
    streamed = [c for d in deltas for c in d.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in streamed] == [(0, *calls[0])]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert json.loads(calls[0][1])["city"] in ("Paris", "Rome", "Oslo")
    # no tools offered (`tool_choice` none): nothing is parsed, the reply is its text
    plain = client.chat.completions.create(**ask, tool_choice="none", extra_body={"guided_regex": regex})
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content


def test_structured_outputs_follow_their_grammar_exactly_in_every_mode(gateway):
    """`response_format` json_schema, vLLM's `guided_regex` and `structured_outputs.choice`: in
    every mode, streamed or not, token for token what the target alone masked by the grammar
    draws (greedy and seeded) — and the output parses and validates."""
    import json

    import jsonschema
    import llguidance

    from specedge.engine.sampling import SamplingSpec
    from specedge.models import chat_prompt_ids
    from tests.structured import COLORS, LAYOUT, PERSON, YES_NO, reference_output

    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    ends = list(model.generation_config.eos_token_id)
    client = gateway.client()
    cases = [
        ("Give me a person as JSON.", llguidance.LLMatcher.grammar_from_json_schema(PERSON, LAYOUT),
         {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}),
        ("Is the sky blue?", llguidance.LLMatcher.grammar_from_regex(YES_NO), {"extra_body": {"guided_regex": YES_NO}}),
        ("Pick a color.", llguidance.grammar_from("choice", COLORS),
         {"extra_body": {"structured_outputs": {"choice": COLORS}}}),
    ]
    for question, grammar, ask in cases:
        prompt = chat_prompt_ids(tok, question)
        messages = [{"role": "user", "content": question}]
        for temperature, seed in ((0.0, 0), (0.9, 7)):
            expected = reference_output(model, tok, prompt, SamplingSpec(temperature=temperature, seed=seed,
                                                                         grammar=grammar), 60, ends)
            assert expected[-1] in ends  # it ends inside the budget
            text = tok.decode(expected, skip_special_tokens=True)
            for mode in ("specedge", "server-only", "autoregressive"):
                body = {**ask.get("extra_body", {}), "specedge": {"mode": mode}}
                reply = client.chat.completions.create(
                    model=MODEL, messages=messages, temperature=temperature, seed=seed, max_tokens=60,
                    **{k: v for k, v in ask.items() if k != "extra_body"}, extra_body=body)
                assert reply.choices[0].message.content == text, (question, mode, temperature)
                assert reply.choices[0].finish_reason == "stop"
                if mode == "specedge" and "response_format" in ask:  # the edge drafts by the grammar too
                    assert speculation(reply, mode)["tokens_per_verification"] >= 2.5
            streamed = "".join(choice.delta.content or "" for chunk in client.chat.completions.create(
                model=MODEL, messages=messages, temperature=temperature, seed=seed, max_tokens=60, stream=True,
                **{k: v for k, v in ask.items() if k != "extra_body"}, extra_body=ask.get("extra_body"))
                for choice in chunk.choices)
            assert streamed == text
            if "response_format" in ask:
                jsonschema.validate(json.loads(text), PERSON)
            elif "guided_regex" in ask.get("extra_body", {}):
                assert re.fullmatch(YES_NO, text)
            else:
                assert text in COLORS
    # json_object on /v1/completions: speculation draws what the target alone draws, and an
    # output that ends (not cut by max_tokens) is a JSON object
    outputs = {mode: client.completions.create(model=MODEL, prompt="A JSON object: ", max_tokens=48, temperature=0,
                                               extra_body={"response_format": {"type": "json_object"},
                                                           "specedge": {"mode": mode}}).choices[0]
               for mode in ("specedge", "autoregressive")}
    assert outputs["specedge"].text == outputs["autoregressive"].text
    assert outputs["specedge"].text.startswith("{")
    if outputs["specedge"].finish_reason == "stop":
        assert isinstance(json.loads(outputs["specedge"].text), dict)
    with pytest.raises(openai.BadRequestError) as err:  # a schema that cannot be followed: a 400 naming the field
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert err.value.body["param"] == "response_format"


@pytest.mark.parametrize("mode", ["specedge", "server-only", "autoregressive"])
def test_echo_returns_the_prompt_with_the_targets_own_logprobs_of_it(gateway, mode):
    """`echo` with `logprobs` (how lm-eval scores a continuation): the prompt, then the
    completion; each prompt token's raw logprob and best alternative as the target alone
    computes them (the first token's null), streamed or not."""
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    text = "The capital of France is Paris. The capital of Italy is"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    client = gateway.client()
    ask = {"model": MODEL, "prompt": text, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1,
           "extra_body": {"specedge": {"mode": mode}}}
    choice = client.completions.create(**ask).choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(text) and len(choice.text) > len(text)
    assert lp.tokens[: len(ids)] == [tok.decode([i]) for i in ids] and len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for k in range(1, len(ids)):
        assert abs(lp.token_logprobs[k] - expected[k - 1, ids[k]].item()) < 1e-4, k
        best = int(expected[k - 1].argmax())
        assert list(lp.top_logprobs[k]) == [tok.decode([best])]
        assert abs(lp.top_logprobs[k][tok.decode([best])] - expected[k - 1, best].item()) < 1e-4
    # the completion's own logprobs follow: its first token is scored after the whole prompt
    assert abs(lp.token_logprobs[len(ids)] - expected[-1].max().item()) < 1e-4
    assert lp.text_offset[: 2] == [0, len(lp.tokens[0])]
    chunks = list(client.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and [round(v, 4) for v in streamed[1:]] == [round(v, 4) for v in lp.token_logprobs[1:]]
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None


@pytest.mark.parametrize("mode", ["specedge", "server-only", "autoregressive"])
def test_prompt_logprobs_are_the_targets_own_with_their_ranks(gateway, mode):
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, else the token's raw
    logprob, its rank in the vocabulary and its text, and the position's best k ranked 1..k —
    as the target alone computes them; per choice on completions (each its own prompt), at
    the top level on chat. Refused when streamed (vLLM's rule)."""
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    client = gateway.client()
    extra = {"specedge": {"mode": mode}, "prompt_logprobs": 2}

    def check(positions: list, ids: list[int]) -> None:
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        assert len(positions) == len(ids) and positions[0] is None
        for i in range(1, len(ids)):
            row, entry, token = expected[i - 1], positions[i], ids[i]
            best = row.topk(2)
            assert len(entry) == 2 + (token not in best.indices.tolist()), entry
            own = entry[str(token)]
            assert abs(own["logprob"] - row[token].item()) < 1e-4 and own["decoded_token"] == tok.decode([token])
            assert int((row > row[token] + 1e-4).sum()) + 1 <= own["rank"] <= int((row >= row[token] - 1e-4).sum())
            for rank, (alternative, value) in enumerate(zip(best.indices.tolist(), best.values.tolist(),
                                                            strict=True), start=1):
                ranked = entry[str(alternative)]
                assert ranked["rank"] == rank and abs(ranked["logprob"] - value) < 1e-4

    texts = ["The capital of France is Paris. The capital of Italy is", "def add(a, b):"]
    reply = client.completions.create(model=MODEL, prompt=texts, max_tokens=2, temperature=0, extra_body=extra)
    for choice in reply.model_dump()["choices"]:
        check(choice["prompt_logprobs"], tok(texts[choice["index"]], add_special_tokens=False)["input_ids"])
    question = "Why is the sky blue?"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          max_tokens=2, temperature=0, extra_body=extra).model_dump()
    check(chat["prompt_logprobs"], chat_prompt_ids(tok, question))
    plain = client.completions.create(model=MODEL, prompt=texts[1], max_tokens=2, temperature=0).model_dump()
    assert plain["choices"][0]["prompt_logprobs"] is None
    with pytest.raises(openai.BadRequestError, match="not available when `stream=True`"):
        client.completions.create(model=MODEL, prompt=texts[1], max_tokens=2, stream=True, extra_body=extra)
    zero = client.completions.create(model=MODEL, prompt=texts[1], max_tokens=2, temperature=0, stream=True,
                                     extra_body={**extra, "prompt_logprobs": 0})  # asks for nothing to stream
    assert "".join(c.choices[0].text for c in zero if c.choices) == plain["choices"][0]["text"]


def test_prompts_as_token_ids_are_served_like_their_text(gateway):
    """OpenAI's token-id prompt forms (what lm-eval sends): one list of ids, or several."""
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    client = gateway.client()
    texts = ["The capital of France is", "def add(a, b):"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ask = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    by_text = [client.completions.create(prompt=t, **ask).choices[0].text for t in texts]
    assert client.completions.create(prompt=ids[0], **ask).choices[0].text == by_text[0]
    both = client.completions.create(prompt=ids, **ask)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == by_text
    assert both.usage.prompt_tokens == sum(map(len, ids))
    echoed = client.completions.create(prompt=ids[1], echo=True, logprobs=0, **ask).choices[0]
    assert echoed.text == texts[1] + by_text[1] and echoed.logprobs.token_logprobs[0] is None
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(prompt=[5, 10**6], **ask)
    assert err.value.body["param"] == "prompt"


def test_a_large_schema_travels_with_its_session(gateway):
    """A structured output's grammar rides in the session's messages: one of ~63 KB with a
    long prompt (more than an edge's message may weigh) is served, exactly as the target
    alone would."""
    import json

    colors = [f"color-number-{i:04d}-of-the-large-palette" for i in range(1500)]
    schema = {"type": "object", "additionalProperties": False, "required": ["color"],
              "properties": {"color": {"enum": colors}}}
    assert len(json.dumps(schema)) > 64 * 1024 * 0.8
    client = gateway.client()
    texts = {mode: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick a color. " * 400}], temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        extra_body={"specedge": {"mode": mode}}).choices[0].message.content for mode in ("specedge", "autoregressive")}
    assert texts["specedge"] == texts["autoregressive"] and json.loads(texts["specedge"])["color"] in colors
