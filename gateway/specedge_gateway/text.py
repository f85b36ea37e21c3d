"""Text in and out of token ids for the gateway, without torch: tokenizer, chat template,
end-of-turn ids, and incremental detokenization.

Owns turning a chat or a prompt into token ids (the target's own `tokenizer.json` through
the `tokenizers` library, its chat template as `apply_chat_template` renders it, with the
request's `tools` and `chat_template_kwargs`) and turning committed ids back into text
piece by piece (`DecodeStream`: each id decoded once), never emitting half a UTF-8
character; with a reasoning parser, a reply's `<think>…</think>` part goes apart
(`ReasoningSplit`); with a tool-call parser, its `<tool_call>` blocks become calls
(`HermesToolCalls`). It knows nothing about HTTP or sessions.
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field

import jinja2
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers.utils.chat_template_utils import render_jinja_template


class TextCodec:
    """One model's tokenizer and chat template, loaded from its folder."""

    def __init__(self, model_dir: str) -> None:
        """`model_dir`: a model's folder, or a hub id already in the local Hugging Face cache
        (nothing is downloaded)."""
        folder = pathlib.Path(model_dir)
        if not folder.is_dir():
            folder = pathlib.Path(_cached(model_dir))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if not template:
            raise ValueError(f"{model_dir} has no chat template")
        self._template = template
        generation = folder / "generation_config.json"
        eos = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
        if eos is None:
            eos = self.tokenizer.token_to_id(config["eos_token"])
        self.eos_ids: list[int] = eos if isinstance(eos, list) else [eos]

    def chat_prompt(self, messages: list[dict[str, str]], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> str:
        """The messages through the model's chat template, rendered as the tokenizer's own
        `apply_chat_template` renders it (transformers' sandboxed environment: `raise_exception`,
        `strftime_now`, loop controls — without importing torch), with `tools` and the
        template's own variables (`template_kwargs`, e.g. Qwen3's `enable_thinking`). A
        template that refuses them raises ValueError with its reason."""
        kwargs = dict(template_kwargs or {})
        if reserved := sorted(RESERVED_TEMPLATE_VARIABLES & kwargs.keys()):
            raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
        try:
            rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=self._template,
                                                add_generation_prompt=True, **kwargs)
        except (jinja2.TemplateError, TypeError) as exc:
            raise ValueError(f"the chat template refuses these messages: {exc}") from None
        return rendered[0]

    @property
    def vocab_size(self) -> int:
        """Token ids below this are the tokenizer's (added tokens included)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token as text, special tokens included (what logprobs name)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)


RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "conversations", "tools", "documents", "chat_template",
                                         "add_generation_prompt", "continue_final_message",
                                         "return_assistant_tokens_mask"})


def _cached(hub_id: str) -> str:
    """The local snapshot of a hub model (`huggingface_hub`'s cache; nothing is downloaded)."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return snapshot_download(hub_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError) as exc:
        raise ValueError(f"--tokenizer {hub_id!r} is neither a folder nor a model in the local Hugging Face "
                         f"cache: {exc}") from None


def _tag_begun(text: str, tag: str) -> int:
    """How many of `text`'s last characters could still be the start of `tag` (held back)."""
    return next((n for n in range(min(len(text), len(tag) - 1), 0, -1) if tag.startswith(text[-n:])), 0)


@dataclass
class ReasoningSplit:
    """Qwen3's reasoning parser (vLLM's `qwen3`): a reply that begins with `<think>` reasons
    up to `</think>` (or its end) and answers after it; any other reply is all answer.
    Streamed text in, the (reasoning, content) parts out — holding back only what could
    still be the opening or closing tag — with the same split as `split` on the whole."""

    START, END = "<think>", "</think>"
    _held: str = ""
    _state: str = "start"  # start (not known yet) -> thinking -> answering

    def add(self, text: str) -> tuple[str, str]:
        held = self._held + text
        if self._state == "start":
            opening = held.lstrip()
            if len(opening) < len(self.START) and self.START.startswith(opening):
                self._held = held
                return "", ""
            if not opening.startswith(self.START):
                self._state, self._held = "answering", ""
                return "", held
            self._state, held = "thinking", opening[len(self.START):]
        if self._state == "answering":
            self._held = ""
            return "", held
        if (at := held.find(self.END)) != -1:
            self._state, self._held = "answering", ""
            return held[:at], held[at + len(self.END):]
        keep = _tag_begun(held, self.END)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep], ""

    def flush(self) -> tuple[str, str]:
        """At the end: what was held back."""
        held, self._held = self._held, ""
        return (held, "") if self._state == "thinking" else ("", held)

    def split(self, text: str) -> tuple[str | None, str]:
        """A whole reply: (reasoning, or None when it does not begin with `<think>`; content)."""
        opening = text.lstrip()
        if not opening.startswith(self.START):
            return None, text
        reasoning, _, content = opening[len(self.START):].partition(self.END)
        return reasoning, content


class HermesToolCalls:
    """The Hermes tool-call parser (vLLM's `hermes`, what Qwen2.5 and Qwen3 write): a reply
    that, with `tool_choice` `auto`, writes `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
    blocks (the last may be left open) calls those functions; the text before the first block
    is the content. A block that is not such JSON leaves the whole reply as text. Streamed:
    content goes out up to the first `<tool_call>` (holding back only what could still be
    that tag); the calls come whole at the end (`flush`) — the same split as `split`."""

    START, END = "<tool_call>", "</tool_call>"
    _PATTERN = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def __init__(self) -> None:
        self._held = ""
        self._calling = False  # the first <tool_call> has begun: everything after it waits

    def add(self, text: str) -> str:
        """Streamed text in; the content that may go out now."""
        held = self._held + text
        if self._calling:
            self._held = held
            return ""
        if (at := held.find(self.START)) != -1:
            self._calling, self._held = True, held[at:]
            return held[:at]
        keep = _tag_begun(held, self.START)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def flush(self) -> tuple[str, list[tuple[str, str]] | None]:
        """At the end: (content still held, the calls or None)."""
        held, self._held = self._held, ""
        calls = self.calls(held) if self._calling else None
        return ("", calls) if calls is not None else (held, None)

    def split(self, text: str) -> tuple[str | None, list[tuple[str, str]] | None]:
        """A whole reply: (its content — None when it is empty and calls were made; the
        (name, JSON arguments) calls, or None)."""
        at = text.find(self.START)
        calls = self.calls(text[at:]) if at != -1 else None
        if calls is None:
            return text, None
        return text[:at] or None, calls

    @classmethod
    def calls(cls, text: str) -> list[tuple[str, str]] | None:
        """The calls `text` (from its first `<tool_call>` on) makes, or None if one is not
        `{"name": str, "arguments": object}` JSON."""
        calls = []
        for closed, open_ in cls._PATTERN.findall(text):
            try:
                value = json.loads(closed or open_)
            except ValueError:
                return None
            if not (isinstance(value, dict) and isinstance(value.get("name"), str)
                    and isinstance(value.get("arguments", {}), dict)):
                return None
            calls.append((value["name"], json.dumps(value.get("arguments", {}), ensure_ascii=False)))
        return calls or None


@dataclass
class IncrementalText:
    """Committed ids in, new text out, in O(new tokens) per call: `tokenizers`' own
    `DecodeStream` turns each id into its text once (holding back an incomplete UTF-8
    character), and any tail that could still become a stop string waits."""

    codec: TextCodec
    stops: list[str] = field(default_factory=list)
    stopped: bool = False
    _pending: str = ""  # decoded, not sent yet: it may begin a stop string
    _stream: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))

    def add(self, tokens: list[int]) -> str:
        """New text that is safe to send now. Sent text never holds the start of a stop
        string, so only what is pending is searched."""
        if self.stopped:
            return ""
        for token in tokens:
            if (piece := self._stream.step(self.codec.tokenizer, token)) is not None:
                self._pending += piece
        pending = self._pending
        if hits := [at for stop in self.stops if (at := pending.find(stop)) != -1]:
            self.stopped, self._pending = True, ""
            return pending[:min(hits)]
        hold = next((n for n in range(min(len(pending), max((len(s) - 1 for s in self.stops), default=0)), 0, -1)
                     if any(s.startswith(pending[-n:]) for s in self.stops)), 0)
        self._pending = pending[len(pending) - hold:]
        return pending[:len(pending) - hold]

    def flush(self) -> str:
        """At the end: whatever was held back (no stop string completed)."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending
