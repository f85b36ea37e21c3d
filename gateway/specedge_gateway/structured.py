"""Structured outputs: what a request may ask the output to follow, as one grammar.

OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's guided fields
(`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, and their newer form
`structured_outputs`) become one llguidance grammar definition (`grammar_of`), carried to
the verifier and the edge in `SamplingSpec.grammar`: every token of the output is drawn
only among those the grammar allows along its path (`specedge.engine.grammar`), so the
output always follows it — and is still exactly what the target alone, masked the same
way, would produce. At most one of them per request; a schema, regex or grammar that does
not compile is a 400 naming the field.

JSON is written compactly, as Python's `json.dumps` writes it (`", "` between items,
`": "` after keys, no other whitespace): free whitespace lets a small model wander off in
newlines. A schema's own `"x-guidance"` options (llguidance's) may say otherwise.

With a reasoning parser, a chat's grammar holds from the end of its reasoning on, as vLLM
applies it (`after_thinking`): the reply may first think freely in `<think>…</think>`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import llguidance
from pydantic import BaseModel, ConfigDict, Field, model_validator

from specedge.protocol import MAX_GRAMMAR_CHARS

MAX_CHARS = MAX_GRAMMAR_CHARS - 256  # a request's grammar: room is left for `after_thinking`'s
# the JSON layout structured outputs are written in (a schema's "x-guidance" may override it)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the output always follows the schema: strict or not


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: one of a JSON schema, a regex, a choice of strings, a grammar."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=1024)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(BaseModel):
    """The request fields that ask for a structured output (both endpoints)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=1024)] | None = None
    guided_grammar: str | None = None  # Lark or GBNF
    structured_outputs: StructuredOutputs | None = None


def _json(schema: dict[str, Any] | str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema is an object")
    return llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_LAYOUT)


def _asked(fields: StructuredFields) -> list[tuple[str, str, Any]]:
    """(field, kind, value) for each structured output the request asks for."""
    asked = []
    if (rf := fields.response_format) is not None and rf.type != "text":
        asked.append(("response_format", "json", {"type": "object"} if rf.type == "json_object"
                      else rf.json_schema.schema_))
    for name, kind in zip(GUIDED_FIELDS, ("json", "regex", "choice", "grammar"), strict=True):
        if (value := getattr(fields, name)) is not None:
            asked.append((name, kind, value))
    if (so := fields.structured_outputs) is not None:
        for kind, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar),
                            ("json", {"type": "object"} if so.json_object else None)):
            if value is not None:
                asked.append(("structured_outputs", kind, value))
    return asked


def grammar_of(fields: StructuredFields) -> str:
    """The llguidance grammar the request's output must follow ("" for none). Raises
    `StructuredOutputError` (naming the field) when it cannot be followed."""
    asked = _asked(fields)
    if not asked:
        return ""
    if len(asked) > 1:
        raise StructuredOutputError(asked[1][0], "ask for one structured output at most "
                                    f"({', '.join(sorted({a[0] for a in asked}))} given)")
    return _compile(*asked[0])


def _compile(name: str, kind: str, value: Any) -> str:
    """One structured output's llguidance grammar, checked; `name`: the field that asked."""
    try:
        if kind == "json":
            grammar = _json(value)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", value)
        else:
            grammar = llguidance.grammar_from("grammar", value)
    except BaseException as exc:  # a compiler's panic (pyo3's PanicException is no Exception) is a bad grammar too
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise StructuredOutputError(name, str(exc) or type(exc).__name__) from exc
    if len(grammar) > MAX_CHARS:
        raise StructuredOutputError(name, f"longer than {MAX_CHARS} characters once compiled")
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise StructuredOutputError(name, error)
    return grammar


class StructuredOutputError(ValueError):
    """A structured output that cannot be followed: `param` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def tool_call_grammar(functions: list[dict[str, Any]], choice: bool, parallel: bool = True) -> str:
    """The grammar of a forced tool call (how vLLM forces one): a named function's arguments
    as JSON of its `parameters` schema; `required` (`choice`), a JSON list of one or more
    `{"name": …, "parameters": …}` (one only without `parallel`), each naming one of
    `functions` with its arguments."""
    def parameters(function: dict[str, Any]) -> dict[str, Any]:
        schema = function.get("parameters")
        return schema if isinstance(schema, dict) and schema else {"type": "object"}

    if not choice:
        schema = parameters(functions[0])
    else:
        schema = {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": [
            {"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
             "properties": {"name": {"const": f["name"]}, "parameters": parameters(f)}} for f in functions]}}
    return _compile("tools", "json", schema)


# Qwen3's reasoning, free up to the first `</think>`, then whitespace, then the answer's grammar
THINKING = ('start: think ws @{answer} | @{answer}\n'
            'think[lazy]: /<think>(.|\\n)*<\\/think>/\n'
            'ws: /[ \\n]*/\n')
ANSWER = "specedge_answer"


def after_thinking(grammar: str) -> str:
    """`grammar` behind an optional `<think>…</think>` (free text, ending at the first
    `</think>`) and whitespace: a structured output held from the end of the reasoning on,
    as vLLM holds one when it runs a reasoning parser. (`_compile` leaves room for it
    under `MAX_GRAMMAR_CHARS`.)"""
    top = json.loads(grammar) if grammar.lstrip().startswith("{") else \
        {"grammars": [{"name": ANSWER, "lark_grammar": grammar}]}
    first = top["grammars"][0]
    answer = first["name"] = first.get("name") or ANSWER
    top["grammars"].insert(0, {"name": "specedge_thinking", "lark_grammar": THINKING.format(answer=answer)})
    return json.dumps(top)


def tool_calls_of(text: str, function: str, choice: bool) -> list[tuple[str, str]] | None:
    """The (name, JSON arguments) calls a forced tool call's output makes — the output of
    `tool_call_grammar`'s grammar — or None when it is not whole (cut by `max_tokens`)."""
    text = text.strip()  # (whitespace after a reasoning's `</think>`)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not choice:
        return [(function, text)]
    return [(item["name"], json.dumps(item["parameters"])) for item in value]
