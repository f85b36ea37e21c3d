"""The drafter and verifier parties: batching across sessions, stale messages, proactive hits."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge.engine.generate import generate
from specedge.engine.parties import Drafter, StaleMessageError, Verifier, _first_choices
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import DraftTree, TreeParams
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled
from specedge.protocol import DraftTreeMsg, tree_depths, tree_temperature


@pytest.fixture(scope="module")
def models():
    return (AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval(),
            AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_DRAFT)).eval())


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 4096, (5 + 7 * i,), generator=gen).tolist() for i in range(n)]


def test_verifying_several_sessions_at_once_equals_one_by_one(models):
    target, draft = models
    drafter = Drafter(draft, TreeParams(budget=12, depth=3, branch=4, beams=6))
    trees = []
    for i, ids in enumerate(prompts(4)):
        drafter.open(f"s{i}", ids)
        trees.append(drafter.draft(f"s{i}"))
    together = Verifier(target)
    apart = Verifier(target)
    for i, ids in enumerate(prompts(4)):
        together.open(f"s{i}", ids, SamplingSpec())
        apart.open(f"s{i}", ids, SamplingSpec())
    assert together.verify(trees) == [apart.verify([t])[0] for t in trees]
    assert together.forward_passes < apart.forward_passes


def test_stale_and_malformed_trees_are_refused_without_changing_the_session(models):
    target, _ = models
    verifier = Verifier(target, max_tree_nodes=8)
    verifier.open("s", prompts(1)[0], SamplingSpec())
    good = DraftTreeMsg(session_id="s", cycle=0, committed_len=5, tokens=[7], parents=[-1])
    with pytest.raises(StaleMessageError):
        verifier.verify([DraftTreeMsg(session_id="s", cycle=1, committed_len=5, tokens=[7], parents=[-1])])
    for bad in ([[7, 8], [-1, 1]], [[99999], [-1]], [[1] * 9, [-1] * 9]):
        with pytest.raises(ValueError, match="malformed tree"):
            verifier.verify([DraftTreeMsg(session_id="s", cycle=0, committed_len=5, tokens=bad[0], parents=bad[1])])
    assert verifier.verify([good])[0].cycle == 0  # the session is intact


def test_a_draft_equal_to_the_target_is_always_accepted_and_proactive_always_hits(models):
    target, _ = models
    params = TreeParams(budget=8, depth=3, branch=2, beams=4)
    out = generate("specedge", Verifier(target), Drafter(target, params), prompts(1)[0], SamplingSpec(),
                   max_new_tokens=40, eos_ids=set())
    assert out.tokens_per_verify[:-1] == [params.depth + 1] * (len(out.tokens_per_verify) - 1)
    assert out.proactive_hit_rate == 1.0


def test_a_tree_sent_ahead_is_the_tree_a_hit_makes_current_and_guesses_that_miss_back_off(models):
    target, draft = models
    drafter, verifier = Drafter(draft, TreeParams(budget=12, depth=3, branch=4, beams=6)), Verifier(target)
    ids = prompts(1)[0]
    drafter.open("s", ids)
    verifier.open("s", ids, SamplingSpec())
    used = 0
    for _ in range(12):
        tree = drafter.draft("s")
        drafter.start_proactive("s")
        while drafter.proactive_step("s"):
            pass
        ahead = drafter.tree_ahead("s")
        assert drafter.tree_ahead("s") is None  # sent once
        result = verifier.verify([tree])[0]
        hit = drafter.on_result(result)
        if ahead is None:
            continue
        assert (ahead.cycle, ahead.committed_len) == (tree.cycle + 1, tree.committed_len + len(ahead.assumed))
        assert hit == (ahead.assumed == [*result.accepted, result.bonus])
        if hit:  # what was sent ahead is exactly the tree the drafter now holds as current
            assert drafter.sessions["s"].current_sent
            assert drafter.draft("s").tokens == ahead.tokens and drafter.draft("s").parents == ahead.parents
            used += 1
    assert used > 0
    drafter.draft("s")  # a current tree to guess from
    session = drafter.sessions["s"]
    session.hit_rate = 0.0  # guesses that keep missing: draft ahead only every PROACTIVE_PROBE-th cycle
    attempts = drafter.stats.proactive_attempts
    for _ in range(Drafter.PROACTIVE_PROBE):
        drafter.start_proactive("s")
        session.cycle += 1
    assert drafter.stats.proactive_attempts == attempts + 1


def test_a_chain_of_trees_sent_ahead_serves_exactly_and_trees_two_deep_become_current(models):
    """The edge drafts two trees ahead, each from the guessed result of the one before, and
    sends both; the verifier takes them while their guesses come true. The output is the
    target's own greedy decoding, token for token."""
    target, draft = models
    tok_ids = [int(t) for t in prompts(1)[0]]
    drafter = Drafter(draft, TreeParams(budget=12, depth=3, branch=4, beams=6), max_ahead=2)
    verifier = Verifier(target)
    drafter.open("s", tok_ids)
    verifier.open("s", tok_ids, SamplingSpec())
    out, queue, two_deep, second = [], [drafter.draft("s")], 0, {}
    while len(out) < 120:
        while drafter.start_proactive("s"):  # a chain of at most two, each finished and sent ahead
            while drafter.proactive_step("s"):
                pass
            sent = drafter.tree_ahead("s")
            assert sent is not None and sent.cycle == queue[-1].cycle + 1
            assert sent.committed_len == queue[-1].committed_len + len(sent.assumed)
            queue.append(sent)
            second[sent.cycle] = len(drafter.sessions["s"].ahead) == 2  # drafted while two trees were out
        assert len(queue) <= 3 and not drafter.start_proactive("s")
        result = verifier.verify([queue.pop(0)])[0]
        out += [*result.accepted, result.bonus]
        hit = drafter.on_result(result)
        assert hit == bool(queue and queue[0].assumed == [*result.accepted, result.bonus])
        if hit:
            assert drafter.sessions["s"].current_sent and drafter.draft("s").tokens == queue[0].tokens
            two_deep += second[queue[0].cycle]
        else:
            queue = [drafter.draft("s")]
    assert two_deep > 0
    reference = target.generate(torch.tensor([tok_ids]), max_new_tokens=len(out), do_sample=False)
    assert out == reference[0, len(tok_ids):].tolist()


def test_trees_scored_at_the_greedy_temperature_are_deeper_and_accept_more(models):
    """Same budget, same prompts, greedy target: trees scored at `tree_temperature(0)` put
    more nodes on the draft's first choices and get more tokens per verification than at
    temperature 1 — the output being the same."""
    target, draft = models
    ids = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))(
        "def parse_date(self, text):\n    \"\"\"Parse a date", add_special_tokens=False)["input_ids"]
    outcome = {}
    for temperature in (1.0, tree_temperature(0.0)):
        drafter = Drafter(draft, TreeParams(budget=16, depth=4, temperature=temperature))
        verifier = Verifier(target)
        drafter.open("s", ids)
        verifier.open("s", ids, SamplingSpec())
        out, per_verify, depth = [], [], []
        while len(out) < 96:
            tree = drafter.draft("s")
            depth.append(max(tree_depths(tree.parents), default=0))
            result = verifier.verify([tree])[0]
            drafter.on_result(result)
            out += [*result.accepted, result.bonus]
            per_verify.append(len(result.accepted) + 1)
        outcome[temperature] = (out[:96], sum(per_verify) / len(per_verify), sum(depth) / len(depth))
    (plain_out, plain_tpv, plain_depth), (greedy_out, greedy_tpv, greedy_depth) = outcome.values()
    assert greedy_out == plain_out
    assert greedy_depth > plain_depth and greedy_tpv > 1.1 * plain_tpv


def test_trees_are_scored_sharper_only_while_the_target_takes_the_drafts_first_choices(models):
    _, draft = models
    drafter = Drafter(draft, TreeParams(budget=8, depth=3, temperature=0.5))
    drafter.open("s", prompts(1)[0])
    session = drafter.sessions["s"]
    session.first_choice_rate = 0.9
    assert drafter.tree_params("s").temperature == 0.5
    session.first_choice_rate = Drafter.SHARPEN_MIN_FIRST_CHOICE - 0.01  # the draft tracks the target poorly
    assert drafter.tree_params("s") == dataclasses.replace(session.params, temperature=1.0)
    # what a cycle counts: root -> 10 (first choice) -> 11 (second choice), then a bonus that was the first
    tree = DraftTree(tokens=[10, 12, 11], parents=[-1, -1, 0], next_tokens=[13, -1, 14], root_next_token=10)
    assert _first_choices(tree, [0, 2], bonus=14) == 2 / 3
    assert _first_choices(tree, [], bonus=12) == 0.0


def test_sessions_of_one_shape_draft_together_whatever_their_temperature(models):
    """A server-side drafter's lockstep batch stays one pass per level when one session is
    scored at temperature 1 (its draft tracks poorly) and another sharper — the same trees
    as drafted one by one."""
    _, draft = models
    params = TreeParams(budget=12, depth=3, branch=4, beams=6, temperature=0.5)
    ids = prompts(2)

    def drafter_with(sessions: list[int]) -> Drafter:
        drafter = Drafter(draft, params)
        for i in sessions:
            drafter.open(f"s{i}", ids[i])
        if 1 in sessions:
            drafter.sessions["s1"].first_choice_rate = 0.1
        return drafter

    together = drafter_with([0, 1])
    trees = together.draft_many(["s0", "s1"])
    assert together.stats.forward_passes == params.depth + 1
    alone = [drafter_with([i]).draft(f"s{i}") for i in (0, 1)]
    assert [(t.tokens, t.parents) for t in trees] == [(t.tokens, t.parents) for t in alone]
    assert together.tree_params("s1").temperature == 1.0 and together.tree_params("s0").temperature == 0.5


def test_logprobs_of_committed_tokens_are_the_targets_own_raw_ones(models):
    """Each committed token's logprob (and its best alternatives) is the log-softmax of the
    target's logits at its position, whatever tree it came through, greedy or sampled."""
    target, draft = models
    drafter = Drafter(draft, TreeParams(budget=12, depth=3, branch=4, beams=6))
    for params in (SamplingSpec(logprobs=3), SamplingSpec(temperature=0.9, seed=4, logprobs=0)):
        verifier = Verifier(target)
        ids = prompts(1)[0]
        drafter.open("s", ids)
        verifier.open("s", ids, params)
        committed = list(ids)
        for _ in range(4):
            result = verifier.verify([drafter.draft("s")])[0]
            drafter.on_result(result)
            new = [*result.accepted, result.bonus]
            assert [e.token for e in result.logprobs] == new
            with torch.no_grad():
                logits = target(torch.tensor([committed + new])).logits[0, len(committed) - 1:-1].float()
            expected = torch.log_softmax(logits, -1)
            for k, entry in enumerate(result.logprobs):
                assert abs(entry.logprob - expected[k, entry.token].item()) < 1e-4
                assert [t for t, _ in entry.top] == expected[k].topk(params.logprobs).indices.tolist()
            committed += new
        drafter.close("s")
    plain = Verifier(target)
    plain.open("p", prompts(1)[0], SamplingSpec())
    tree = DraftTreeMsg(session_id="p", cycle=0, committed_len=5, tokens=[7], parents=[-1])
    assert plain.verify([tree])[0].logprobs == []  # not asked: not computed


def test_prompt_logprobs_are_the_targets_own_across_prefill_chunks(models):
    """`SamplingSpec.prompt_logprobs`: a prompt prefilled in several chunks, some riding
    along with another session's verification, is scored token by token as the target
    alone scores it (the first token has none), and handed out once."""
    target, _ = models
    verifier = Verifier(target)
    prompt = torch.randint(3, 4096, (2 * verifier.prefill_chunk + 37,), generator=torch.Generator().manual_seed(3))
    prompt = prompt.tolist()
    with torch.no_grad():
        expected = torch.log_softmax(target(torch.tensor([prompt])).logits[0].float(), -1)
    verifier.open("other", [5, 6, 7], SamplingSpec())
    verifier.begin("s", prompt, SamplingSpec(prompt_logprobs=2))
    assert verifier.take_prompt_logprobs("s") is None  # not prefilled yet
    cycle = 0
    while verifier.prefilling("s"):
        tree = DraftTreeMsg(session_id="other", cycle=cycle, committed_len=3 + cycle, tokens=[], parents=[])
        verifier.step([tree], prefill_budget=verifier.prefill_chunk)
        cycle += 1
    entries = verifier.take_prompt_logprobs("s")
    assert verifier.take_prompt_logprobs("s") is None
    assert [e.token for e in entries] == prompt and entries[0].logprob is None
    got = torch.tensor([e.logprob for e in entries[1:]])
    want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert torch.allclose(got, want, atol=1e-4)
    best = expected[:-1].topk(2)
    assert [[t for t, _ in e.top] for e in entries[1:]] == best.indices.tolist()
    # each token's rank: the tokens at least as likely (a margin for a near-tie in the last bits)
    above = (expected[:-1] > want[:, None] + 1e-4).sum(-1) + 1
    at_least = (expected[:-1] >= want[:, None] - 1e-4).sum(-1)
    ranks = torch.tensor([e.rank for e in entries[1:]])
    assert bool(((above <= ranks) & (ranks <= at_least)).all()) and entries[0].rank is None
