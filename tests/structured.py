"""Structured outputs' reference: target-alone decoding, one token at a time, masked by a
grammar read straight with llguidance (not `engine.grammar`), and the grammars the tests use."""

import llguidance
import llguidance.hf
import numpy as np
import torch

from specedge.engine.sampling import SamplingSpec, sample

LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # the gateway's JSON layout
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "bb", "ccc"]}}}}
YES_NO = r"(yes|no), because [a-z ]{1,24}\."
COLORS = ["red", "green", "blue"]


class Reference:
    """One output's grammar: which tokens the next draw may take (special tokens never, the
    ends of the output once the grammar is complete), and the draw."""

    def __init__(self, tokenizer, grammar: str, end_ids: list[int], vocab: int) -> None:
        self.ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        self.end_ids, self.vocab = end_ids, vocab
        self.specials = [t for t in range(vocab) if self.ll.is_special_token(t)]
        self.done = False

    def mask(self) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[: self.vocab].astype(bool))
        allowed[self.specials] = False
        allowed[self.end_ids] = self.matcher.is_accepting()
        return allowed

    def step(self, logits: torch.Tensor, params: SamplingSpec, position: int) -> int:
        token = int(sample(logits[None].float(), params, [position], masks=self.mask()[None])[0])
        if token in self.end_ids:
            self.done = True
        else:
            assert self.matcher.consume_token(token)
        return token


def reference_output(target, tokenizer, prompt: list[int], params: SamplingSpec, max_new: int,
                     end_ids: list[int]) -> list[int]:
    """The target alone, masked by `params.grammar`, drawing with `params` (ends included)."""
    reference, out = Reference(tokenizer, params.grammar, end_ids, target.config.vocab_size), []
    with torch.no_grad():
        while not reference.done and len(out) < max_new:
            logits = target(torch.tensor([prompt + out])).logits[0, -1]
            out.append(reference.step(logits, params, len(prompt) + len(out)))
    return out
