"""Text in and out of token ids for the gateway, without torch: tokenizer, chat template,
end-of-turn ids, and incremental detokenization.

Owns turning a chat or a prompt into token ids (the target's own `tokenizer.json` through
the `tokenizers` library, its chat template through a sandboxed Jinja environment) and
turning committed ids back into text piece by piece, never emitting half a UTF-8
character. It knows nothing about HTTP or sessions.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TextCodec:
    """One model's tokenizer and chat template, loaded from its folder."""

    def __init__(self, model_dir: str) -> None:
        folder = pathlib.Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if not template:
            raise ValueError(f"{model_dir} has no chat template")
        self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        generation = folder / "generation_config.json"
        eos = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
        if eos is None:
            eos = self.tokenizer.token_to_id(config["eos_token"])
        self.eos_ids: list[int] = eos if isinstance(eos, list) else [eos]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self._template.render(messages=messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class IncrementalText:
    """Committed ids in, new text out; holds back an incomplete UTF-8 character and any
    tail that could still become a stop string."""

    codec: TextCodec
    stops: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    emitted: str = ""
    stopped: bool = False

    def add(self, tokens: list[int]) -> str:
        """New text that is safe to send now."""
        self.ids += tokens
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        for stop in self.stops:
            at = text.find(stop, max(0, len(self.emitted) - len(stop)))
            if at != -1:
                self.stopped = True
                return self._emit(text[:at])
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = len(text)
        for n in range(hold, 0, -1):  # a tail that begins a stop string waits
            if any(s.startswith(text[-n:]) for s in self.stops):
                safe = len(text) - n
                break
        return self._emit(text[:safe])

    def flush(self) -> str:
        """At the end: whatever was held back (no stop string completed)."""
        return "" if self.stopped else self._emit(self.codec.decode(self.ids))

    def _emit(self, text: str) -> str:
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += new
        return new
