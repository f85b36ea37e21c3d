"""Structured outputs in the engine: a grammar masks every tree node's row by the state along
its own path, so any tree commits what the target alone, masked token by token, commits;
and the drafter drafts only what the grammar allows.

The reference decoding here uses llguidance directly (a matcher advanced one drawn token at
a time, `tests.structured`), not `engine.grammar`."""

import json
import random

import llguidance
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge.engine.acceptance import accept, accept_batch
from specedge.engine.generate import generate
from specedge.engine.grammar import Constraint, GrammarError, grammar_vocab
from specedge.engine.parties import Drafter, Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import TreeParams
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled, chat_prompt_ids
from specedge.protocol import MODES, DraftTreeMsg
from tests.structured import COLORS, LAYOUT, PERSON, YES_NO, Reference, reference_output

VOCAB = 4096
END = 2  # <|im_end|>
GRAMMARS = {
    "json_schema": llguidance.LLMatcher.grammar_from_json_schema(PERSON, LAYOUT),
    "regex": llguidance.LLMatcher.grammar_from_regex(YES_NO),
    "choice": llguidance.grammar_from("choice", COLORS),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return grammar_vocab(tokenizer, VOCAB)


@pytest.fixture(scope="module")
def models():
    return (AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval(),
            AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_DRAFT)).eval())


def toy_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(hash(prefix) % 2**31)) * 3


@pytest.mark.parametrize("kind", sorted(GRAMMARS))
@pytest.mark.parametrize("params", [SamplingSpec(), SamplingSpec(temperature=1.0, seed=11, top_k=50)],
                         ids=["greedy", "seeded"])
def test_any_tree_commits_what_masked_target_alone_decoding_commits(tokenizer, vocab, kind, params):
    """Random trees — nodes on the reference's track, nodes the grammar allows but the target
    does not draw, nodes the grammar forbids — commit the reference's tokens, by the plain
    and the batched rule alike (batched beside an unconstrained tree)."""
    params = SamplingSpec(temperature=params.temperature, seed=params.seed, top_k=params.top_k,
                          grammar=GRAMMARS[kind], end_ids=[END])
    rng = random.Random(kind)
    for trial in range(12):
        context = (rng.randrange(3, VOCAB), rng.randrange(3, VOCAB))
        reference, expected = Reference(tokenizer, params.grammar, [END], VOCAB), []
        while not reference.done and len(expected) < 40:
            expected.append(reference.step(toy_logits(context + tuple(expected)), params, 100 + len(expected)))
        done = expected[: rng.randrange(0, max(1, len(expected) - 1))]  # committed before this tree
        constraint = Constraint(vocab, params.grammar, [END], VOCAB)
        constraint.advance(done)
        tokens, parents, prefixes = [], [], [context + tuple(done)]
        for i in range(rng.randrange(0, 24)):
            parent = rng.randrange(-1, i)
            above = prefixes[parent + 1]
            depth = len(above) - len(context) - len(done)
            on_track = above[len(context):] == tuple(expected[: len(done) + depth])
            roll = rng.random()
            if on_track and roll < 0.5 and len(done) + depth < len(expected):
                token = expected[len(done) + depth]
            elif roll < 0.8 and (state := constraint.after_path(list(above[len(context) + len(done):]))) is not None:
                token = rng.choice(constraint.allowed([state])[0].nonzero().flatten().tolist())
            else:
                token = rng.randrange(VOCAB)
            tokens.append(token)
            parents.append(parent)
            prefixes.append(above + (token,))
        logits = torch.stack([toy_logits(p) for p in prefixes])
        masks = constraint.tree_masks(tokens, parents)
        path, bonus = accept(tokens, parents, logits, params, 100 + len(done) - 1, masks=masks)
        committed = [tokens[i] for i in path] + [bonus]
        if END in committed:  # the output ends there (what follows is never sent)
            committed = committed[: committed.index(END) + 1]
        assert committed == expected[len(done) : len(done) + len(committed)], trial
        other = torch.randn(3, VOCAB)
        both = accept_batch([([5, 6], [-1, 0]), (tokens, parents)], torch.cat([other, logits]),
                            [SamplingSpec(), params], [7, 100 + len(done) - 1],
                            masks=torch.cat([torch.ones(3, VOCAB, dtype=torch.bool), masks]))
        assert both[1] == (path, bonus)
        assert both[0] == accept([5, 6], [-1, 0], other, SamplingSpec(), 7)


def test_the_drafter_drafts_only_what_the_grammar_allows(models, tokenizer, vocab):
    target, draft = models
    drafter = Drafter(draft, TreeParams(budget=24, depth=5, branch=4, beams=6), grammar_vocab=vocab)
    prompt = chat_prompt_ids(tokenizer, "Describe a person in JSON.")
    drafter.open("s", prompt, grammar=GRAMMARS["json_schema"], end_ids=[END])
    tree = drafter.draft("s")
    assert len(tree.tokens) > 4
    check = Constraint(vocab, GRAMMARS["json_schema"], [END], VOCAB)
    states = [check.state]
    for token, parent in zip(tree.tokens, tree.parents, strict=True):
        assert check.allowed([states[parent + 1]])[0, token], tokenizer.decode([token])
        states.append(check.after(states[parent + 1], token))
    assert tokenizer.decode([tree.tokens[0]]).startswith("{")


@pytest.mark.parametrize("kind", sorted(GRAMMARS))
def test_every_mode_generates_the_masked_targets_output_and_it_follows_the_grammar(models, tokenizer, vocab, kind):
    """The bundled models in all three modes, greedy and seeded: token for token the
    reference's output, which ends inside the budget and follows the grammar."""
    target, draft = models
    verifier = Verifier(target, grammar_vocab=vocab)
    drafter = Drafter(draft, TreeParams(budget=16, depth=4, branch=4, beams=4), grammar_vocab=vocab)
    prompt = chat_prompt_ids(tokenizer, "Give me a person as JSON." if kind == "json_schema" else "Is the sky blue?")
    for params in (SamplingSpec(grammar=GRAMMARS[kind], end_ids=[END]),
                   SamplingSpec(temperature=0.9, seed=5, grammar=GRAMMARS[kind], end_ids=[END])):
        expected = reference_output(target, tokenizer, prompt, params, 60, [END])
        assert expected[-1] == END
        text = tokenizer.decode(expected[:-1])
        if kind == "json_schema":
            value = json.loads(text)
            assert set(value) == {"name", "age", "tags"} and 0 <= value["age"] <= 120
        elif kind == "choice":
            assert text in COLORS
        for mode in MODES:
            result = generate(mode, verifier, drafter, prompt, params, 60, {END})
            assert result.token_ids == expected, (mode, params.temperature)


def test_a_grammar_that_does_not_compile_or_has_no_tokenizer_is_refused(models, vocab):
    target, _ = models
    with pytest.raises(GrammarError):
        Verifier(target, grammar_vocab=vocab).open("s", [5, 6], SamplingSpec(grammar="start: nothing_here"))
    with pytest.raises(GrammarError):
        Verifier(target).open("s", [5, 6], SamplingSpec(grammar=GRAMMARS["regex"]))


def test_a_resumed_session_picks_up_the_grammar_where_its_output_stands(models, tokenizer, vocab):
    """Re-prefilled elsewhere mid-output (`prompt_len`), a session goes on exactly."""
    target, _ = models
    prompt = chat_prompt_ids(tokenizer, "Give me a person as JSON.")
    params = SamplingSpec(grammar=GRAMMARS["json_schema"], end_ids=[END])
    expected = reference_output(target, tokenizer, prompt, params, 60, [END])
    half = len(expected) // 2
    verifier = Verifier(target, grammar_vocab=vocab)
    verifier.open("s", prompt + expected[:half], params, cycle=half, prompt_len=len(prompt))
    out = []
    while END not in out:
        tree = DraftTreeMsg(session_id="s", cycle=half + len(out), committed_len=len(prompt) + half + len(out),
                            tokens=[], parents=[])
        out.append(verifier.verify([tree])[0].bonus)
    assert expected[:half] + out == expected


def test_drafting_by_the_grammar_keeps_trees_useful(models, tokenizer, vocab):
    """The same exact output; with the grammar the drafter's trees are accepted far deeper
    (free drafts mostly propose what the grammar forbids)."""
    target, draft = models
    params = SamplingSpec(grammar=GRAMMARS["json_schema"], end_ids=[END])
    prompt = chat_prompt_ids(tokenizer, "Give me a person as JSON.")
    runs = [generate("specedge", Verifier(target, grammar_vocab=vocab),
                     Drafter(draft, TreeParams(budget=16, depth=4, branch=4, beams=4), grammar_vocab=drafter_vocab),
                     prompt, params, 60, {END}) for drafter_vocab in (vocab, None)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].mean_tokens_per_verify > 2 * runs[1].mean_tokens_per_verify


def test_a_drafter_that_cannot_read_the_grammar_drafts_freely(models, tokenizer, vocab):
    _, draft = models
    drafter = Drafter(draft, TreeParams(budget=8, depth=2, branch=4, beams=4), grammar_vocab=vocab)
    drafter.open("s", [5, 6, 7], grammar="start: nothing_here", end_ids=[END])
    assert drafter.sessions["s"].constraint is None and len(drafter.draft("s").tokens) > 0


@pytest.mark.parametrize(("kind", "value", "answer", "wrong"), [
    ("json", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}, '{"a": 12}', '{"b": 1}'),
    ("regex", "[0-9]{2,4}", "123", "12a"),
    ("choice", ["yes", "no"], "yes", "maybe"),
    ("grammar", 'start: "a" b\nb: "c"+', "acc", "ab"),
    ("grammar", 'root ::= "x" [0-9]+', "x42", "y42"),
])
def test_with_a_reasoning_parser_the_grammar_holds_after_the_reasoning(tokenizer, vocab, kind, value, answer, wrong):
    """`structured.after_thinking` (the gateway's, with `--reasoning-parser`): the reply may
    first think anything in `<think>…</think>` — up to the first `</think>` — then only the
    answer's grammar; or answer straight away."""
    from specedge_gateway.structured import _compile, after_thinking

    grammar = after_thinking(_compile("x", kind, value))

    def follows(text: str) -> bool:
        constraint = Constraint(vocab, grammar, [END], VOCAB)
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if not constraint.allowed([constraint.state])[0, token]:
                return False
            constraint.advance([token])
        return bool(constraint.allowed([constraint.state])[0, END])

    thought = '<think>Let me see: {"b": 1}, maybe yes.\nDone.</think>'
    assert follows(answer) and follows(f"{thought}\n\n{answer}") and follows(f"<think></think>{answer}")
    assert not follows(wrong) and not follows(f"{thought}\n\n{wrong}")
    assert not follows(f"Well {answer}") and not follows(f"<think>a</think> </think>{answer}")
    assert not follows(f"{thought}\n\n")  # the answer is not optional
