"""The draft tree builder with the real draft model: shape, budget, and complete draft KV."""

import torch
from transformers import AutoModelForCausalLM

from specedge.engine.runner import ForwardRequest, ModelRunner
from specedge.engine.tree import TreeJob, TreeParams, grow_trees
from specedge.models import BUNDLED_DRAFT, bundled


def test_tree_is_compact_budgeted_and_every_kept_node_has_its_kv():
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_DRAFT)).eval()
    params = TreeParams(budget=20, depth=4, branch=4, beams=8)
    runner = ModelRunner(model, max_sessions=2, max_len=256)
    prompt = torch.randint(0, 4096, (25,), generator=torch.Generator().manual_seed(0)).tolist()
    runner.open("d")
    runner.prefill("d", prompt[:-1])
    job = TreeJob("d", prompt[-1])
    passes = list(grow_trees(runner, [job], params))
    tree = job.tree()
    assert 1 <= len(passes) <= params.depth + 1
    assert len(tree) == params.budget
    assert all(-1 <= p < i for i, p in enumerate(tree.parents))
    assert max(tree.depths()) <= params.depth
    siblings = {(p, t) for p, t in zip(tree.parents, tree.tokens, strict=True)}
    assert len(siblings) == len(tree)  # no two siblings carry the same token
    # Accept the deepest path: its draft KV must already be there (last level included).
    deepest = max(range(len(tree)), key=lambda i: tree.depths()[i])
    path = []
    while deepest >= 0:
        path.insert(0, deepest)
        deepest = tree.parents[deepest]
    runner.commit("d", [job.root_scratch, *(job.scratch_index(tree.grown_index[i]) for i in path)])
    next_token = 11
    out = runner.forward([ForwardRequest("d", [next_token], [-1])])[0][0]
    with torch.no_grad():
        expected = model(torch.tensor([prompt + [tree.tokens[i] for i in path] + [next_token]])).logits[0, -1]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_trees_of_several_sessions_grow_in_one_pass_each():
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_DRAFT)).eval()
    params = TreeParams(budget=8, depth=3, branch=3, beams=4)
    runner = ModelRunner(model, max_sessions=3, max_len=128)
    jobs = []
    for i, n in enumerate((5, 30, 12)):
        runner.open(f"s{i}")
        runner.prefill(f"s{i}", list(range(100, 100 + n)))
        jobs.append(TreeJob(f"s{i}", 7))
    assert len(list(grow_trees(runner, jobs, params))) == params.depth + 1
    alone = ModelRunner(model, max_sessions=1, max_len=128)
    alone.open("x")
    alone.prefill("x", list(range(100, 130)))
    single = TreeJob("x", 7)
    list(grow_trees(alone, [single], params))
    assert jobs[1].tree().tokens == single.tree().tokens
    assert jobs[1].tree().parents == single.tree().parents
