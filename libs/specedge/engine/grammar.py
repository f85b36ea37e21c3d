"""Structured outputs: a grammar (llguidance) that decides which tokens each row may draw.

A session with a grammar (`SamplingSpec.grammar`, an llguidance grammar definition the
gateway built from `response_format` or vLLM's guided fields) draws every token from
logits masked by the grammar's state *after that row's own path*: the root's row by the
state of the committed output, a tree node's row by that state advanced over the drafted
tokens from the root down to the node. So a tree of any shape draws exactly what the
target alone, masked token by token, would draw; the verifier masks its rows this way
(`tree_masks`), and the drafter masks the rows it grows from (`Constraint.allowed`) so its
trees hold only tokens the grammar allows.

The ends of the output (`end_ids`: end of turn, `stop_token_ids`) may be drawn exactly
when the grammar is complete (accepting); other special tokens (the tokenizer's own
end-of-sequence among them) never. A row whose path left the grammar — a drafted token it does not
allow, or anything after an end — is never drawn from for the output (its node can never
be accepted), and is left unmasked.

Pure bookkeeping on the host; masks come out as boolean tensors on the asked device.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import llguidance
import llguidance.hf
import numpy as np
import torch


class GrammarError(ValueError):
    """A structured output this model cannot follow: the grammar does not compile, or there is no tokenizer."""


log = logging.getLogger(__name__)
State = llguidance.LLMatcher | None  # the grammar after a path; None: the path left it (or ended)


@dataclass(frozen=True, eq=False)
class GrammarVocab:
    """llguidance's view of a model's tokenizer, and its special tokens (never drawn under a
    grammar unless they end the output)."""

    tokenizer: llguidance.LLTokenizer
    specials: list[int]


@functools.lru_cache(maxsize=4)
def grammar_vocab(tokenizer, vocab_size: int) -> GrammarVocab | None:
    """From a Hugging Face fast tokenizer, over a model's `vocab_size` logits rows (built
    once per tokenizer: up to about a second for a large vocabulary); None, with a warning,
    for a tokenizer llguidance cannot read (a service then refuses — the verifier — or
    drafts freely — an edge — what asks for a structured output, and serves the rest)."""
    try:
        ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(vocab_size, len(tokenizer)))
    except Exception as exc:  # a slow tokenizer, or one llguidance cannot parse
        log.warning("structured outputs are off: llguidance cannot read this tokenizer (%s)", exc)
        return None
    return GrammarVocab(ll, [t for t in range(ll.vocab_size) if ll.is_special_token(t)])


class Constraint:
    """One session's grammar: its state after the committed output, and masks for paths from it."""

    def __init__(self, vocab: GrammarVocab, grammar: str, end_ids: list[int], vocab_size: int) -> None:
        """Raises GrammarError when the grammar does not compile."""
        self.matcher = llguidance.LLMatcher(vocab.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.end_ids = sorted({t for t in end_ids if 0 <= t < vocab_size})
        self.vocab_size = vocab_size
        self._words = vocab.tokenizer.vocab_size
        self._specials = sorted(set(vocab.specials) - set(self.end_ids))
        self.ended = False  # the committed output holds an end token

    @property
    def state(self) -> State:
        """The state after the committed output."""
        return None if self.ended else self.matcher

    def advance(self, tokens: list[int]) -> None:
        """Commit output tokens (drawn under this grammar's masks), up to an end."""
        for token in tokens:
            if self.ended:
                return
            if token in self.end_ids:
                self.ended = True
            elif not self.matcher.consume_token(token):
                raise ValueError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    def after(self, state: State, token: int) -> State:
        """The state after `state` and then `token` (None when that leaves the grammar or ends)."""
        if state is None or token in self.end_ids or not 0 <= token < self._words:
            return None
        child = state.deep_copy()
        return child if child.consume_token(token) else None

    def after_path(self, tokens: list[int]) -> State:
        """The state after the committed output and then `tokens` (a copy: committing more leaves it as it is)."""
        state = self.state.deep_copy() if self.state is not None else None
        for token in tokens:
            state = self.after(state, token)
        return state

    def allowed(self, states: list[State], device: torch.device | str = "cpu") -> torch.Tensor:
        """[len(states), vocab] bool: what each row may draw (all True for a row off the grammar)."""
        rows = np.ones((len(states), self.vocab_size), dtype=bool)
        for i, state in enumerate(states):
            if state is None:
                continue
            bits = np.frombuffer(state.compute_bitmask(), dtype=np.uint8)
            words = np.unpackbits(bits, bitorder="little")[: min(self._words, self.vocab_size)].astype(bool)
            row = rows[i]
            row[:] = False
            row[: len(words)] = words
            row[self._specials] = False
            if self.end_ids:
                row[self.end_ids] = state.is_accepting()
            if not row.any():  # nothing left to draw (a grammar complete with no end to draw): unconstrained
                row[:] = True
        return torch.from_numpy(rows).to(device)

    def tree_masks(self, tokens: list[int], parents: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """[1 + len(tokens), vocab] bool: the root's row, then each drafted node's (parents first)."""
        states: list[State] = [self.state]
        for token, parent in zip(tokens, parents, strict=True):
            states.append(self.after(states[parent + 1], token))
        return self.allowed(states, device)


def compile_for(vocab: GrammarVocab | None, grammar: str, end_ids: list[int],
                vocab_size: int) -> Constraint | None:
    """A session's constraint, or None without a grammar. Raises ValueError when there is a
    grammar but no tokenizer to read it with, or it does not compile (GrammarError)."""
    if not grammar:
        return None
    if vocab is None:
        raise GrammarError("structured outputs need the model's tokenizer, and this model has none")
    return Constraint(vocab, grammar, end_ids, vocab_size)
