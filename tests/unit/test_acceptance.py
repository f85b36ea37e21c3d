"""The acceptance rule: table-driven greedy cases, a slow reference it must equal on random
trees, and a statistical test that sampled tokens follow the target distribution."""

import random

import pytest
import torch

from specedge.engine.acceptance import accept
from specedge.engine.sampling import SamplingSpec, filtered_probs, uniform

V = 8
GREEDY = SamplingSpec()


def one_hot_logits(argmaxes: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits


# tree: root -> 0:a=3 -> 1:b=4 -> 2:c=5 ; root -> 3:d=6 (logits rows: the root's, then each node's)
TOKENS = [3, 4, 5, 6]
PARENTS = [-1, 0, 1, -1]


@pytest.mark.parametrize(
    ("name", "tokens", "parents", "target_argmax", "path", "bonus"),
    [
        ("full accept", TOKENS, PARENTS, [3, 4, 5, 7, 0], [0, 1, 2], 7),
        ("early reject", TOKENS, PARENTS, [3, 2, 5, 7, 0], [0], 2),
        ("reject at root", TOKENS, PARENTS, [1, 4, 5, 7, 0], [], 1),
        ("other branch", TOKENS, PARENTS, [6, 4, 5, 7, 2], [3], 2),
        ("empty tree", [], [], [6], [], 6),
    ],
)
def test_greedy_table(name, tokens, parents, target_argmax, path, bonus):
    assert accept(tokens, parents, one_hot_logits(target_argmax), GREEDY, root_position=10) == (path, bonus)


def reference_accept(tokens, parents, logits, params, root_position):
    """Slow, obviously-correct version: draw lazily, walk, per node in pure Python."""
    def depth(i):  # node i's level; the root (-1) is level 0
        return 0 if i < 0 else depth(parents[i]) + 1

    def draw(i):
        row = logits[i + 1].tolist()
        if params.greedy:
            return max(range(len(row)), key=lambda t: (row[t], -t))
        probs = filtered_probs(logits[i + 1 : i + 2], params)[0].tolist()
        u = uniform(params.seed, root_position + depth(i) + 1)
        acc = 0.0
        total = sum(probs)
        for t, p in enumerate(probs):
            acc += p
            if acc > u * total:
                return t
        return len(probs) - 1

    node, path = -1, []
    while True:
        token = draw(node)
        kids = [i for i in range(len(tokens)) if parents[i] == node and tokens[i] == token]
        if not kids:
            return path, token
        node = kids[0]
        path.append(node)


def random_tree(rng: random.Random, n: int):
    tokens, parents = [], []
    for i in range(n):
        tokens.append(rng.randrange(V))
        parents.append(rng.randrange(-1, i))
    return tokens, parents


@pytest.mark.parametrize("params", [GREEDY, SamplingSpec(temperature=0.8, seed=3),
                                    SamplingSpec(temperature=1.3, top_p=0.7, top_k=5, seed=11)])
def test_equals_slow_reference_on_random_trees(params):
    rng = random.Random(0)
    for trial in range(300):
        tokens, parents = random_tree(rng, rng.randrange(0, 23))
        logits = torch.randn(1 + len(tokens), V, generator=torch.Generator().manual_seed(trial)) * 2
        # Make acceptance likely: often let the target agree with some child.
        assert accept(tokens, parents, logits, params, 100 + trial) == \
            reference_accept(tokens, parents, logits, params, 100 + trial)


def test_sampled_tokens_follow_the_target_distribution():
    """Chi-square: bonus tokens drawn at many positions match softmax(logits / T) filtered."""
    params = SamplingSpec(temperature=0.9, top_p=0.9, top_k=6, seed=1234)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    expected = filtered_probs(logits, params)[0]
    n = 20000
    counts = torch.zeros(V)
    for position in range(n):
        _, bonus = accept([], [], logits, params, root_position=position)
        counts[bonus] += 1
    support = expected > 0
    assert counts[~support].sum() == 0  # filtered tokens are never drawn
    chi2 = (((counts - n * expected) ** 2) / (n * expected))[support].sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < 20.5, (chi2, dof)  # 99.9th percentile of chi2 with <= 5 dof is 20.5


def test_draft_is_irrelevant_to_the_output_distribution():
    """Whatever the tree proposes, the token committed at each position is the same draw."""
    params = SamplingSpec(temperature=1.0, seed=7)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    alone = accept([], [], logits, params, root_position=41)[1]
    tree_logits = logits.repeat(3, 1)
    for child_token in range(V):
        path, bonus = accept([child_token, 2], [-1, 0], tree_logits, params, root_position=41)
        first = [child_token] if path else [bonus]
        assert first == [alone]


def test_a_tree_commits_what_decoding_one_token_at_a_time_commits():
    """Every node gets the logits of its own prefix (a toy target: logits a function of the
    tokens so far), so a rule that read another node's row, or drew at another position,
    would commit something else than plain decoding does."""
    from specedge.engine.sampling import sample

    def toy_logits(prefix: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(V, generator=torch.Generator().manual_seed(hash(prefix) % 2**31)) * 2

    rng = random.Random(5)
    for params in (GREEDY, SamplingSpec(temperature=0.9, top_p=0.95, seed=8)):
        for trial in range(200):
            context, root_position = (rng.randrange(V), rng.randrange(V)), 50 + trial
            sequential = []  # plain decoding, one token per step
            for k in range(8):
                row = toy_logits(context + tuple(sequential))[None]
                sequential.append(int(sample(row, params, [root_position + 1 + k])[0]))
            tokens, parents, prefixes = [], [], [context]  # prefixes: the root's, then each node's
            for i in range(rng.randrange(1, 15)):
                parent = rng.randrange(-1, i)
                above = prefixes[parent + 1]
                depth = len(above) - len(context)
                # often the token plain decoding takes there, so that paths get accepted
                on_track = above[len(context):] == tuple(sequential[:depth]) and depth < 8
                token = sequential[depth] if on_track and rng.random() < 0.7 else rng.randrange(V)
                tokens.append(token)
                parents.append(parent)
                prefixes.append(above + (token,))
            logits = torch.stack([toy_logits(p) for p in prefixes])
            path, bonus = accept(tokens, parents, logits, params, root_position)
            committed = [tokens[i] for i in path] + [bonus]
            assert committed == sequential[: len(committed)], (trial, params)
