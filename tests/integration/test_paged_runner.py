"""The paged runner (FlexAttention over the KV pool) against the reference runner, and its
cache accounting: logits, commits as page-table updates, capacity, transfers per pass."""


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from specedge.engine.acceptance import accept
from specedge.engine.kv_pool import EXTENT, CacheFullError, SlotPool, plan
from specedge.engine.paged_runner import PagedRunner, query_intervals
from specedge.engine.parties import Verifier
from specedge.engine.runner import ForwardRequest, ModelRunner
from specedge.engine.sampling import SamplingSpec
from specedge.models import BUNDLED_TARGET, bundled
from specedge.protocol import DraftTreeMsg
from specedge_bench.verify import count_host_transfers

ATOL = 1e-5  # float32 on CPU: the two backends differ only in the order of the softmax's sums


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()


@st.composite
def trees(draw, max_nodes=12):
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, n)]
    return draw(st.lists(st.integers(0, 4095), min_size=n, max_size=n)), parents


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sessions=st.lists(st.tuples(st.integers(1, 300), trees(), trees(max_nodes=4)), min_size=1, max_size=6),
       data=st.data())
def test_random_trees_and_co_batched_sessions_give_the_reference_logits(model, sessions, data):
    """Random prefixes, a first tree, a commit of a random path keeping a subtree, then a
    second tree below what was kept: every node's logits equal the reference backend's."""
    ref = ModelRunner(model, max_sessions=len(sessions) + 1, max_len=400, max_scratch=128, prefill_chunk=64)
    # prompts in chunks of 128: the paged runner attends them in rows of its own, beside trees
    paged = PagedRunner(model, kv_tokens=(len(sessions) + 2) * 8 * EXTENT, max_len=400, max_scratch=128,
                        prefill_chunk=128)
    gen = torch.Generator().manual_seed(len(sessions))
    for i, (length, _, _) in enumerate(sessions):
        prefix = torch.randint(0, 4096, (length,), generator=gen).tolist()
        for runner in (ref, paged):
            runner.open(f"s{i}")
            runner.prefill(f"s{i}", prefix)
    # beside the trees, a prompt chunk longer than a row of queries (the paged runner's
    # second kernel call)
    chunk = torch.randint(0, 4096, (100,), generator=gen).tolist()
    for runner in (ref, paged):
        runner.open("chunk")
    first = [ForwardRequest(f"s{i}", t, p) for i, (_, (t, p), _) in enumerate(sessions)]
    first.append(ForwardRequest("chunk", chunk, list(range(-1, 99))))
    for a, b in zip(ref.forward(first), paged.forward(first), strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    second = []
    for i, (_, (tokens, parents), (more, more_parents)) in enumerate(sessions):
        node = data.draw(st.integers(0, len(tokens) - 1))
        path = [node]
        while parents[path[0]] >= 0:
            path.insert(0, parents[path[0]])
        below = [j for j in range(len(tokens)) if parents[j] == node]
        keep = [j for j in below if data.draw(st.booleans())]
        for runner in (ref, paged):
            runner.commit(f"s{i}", path, keep)
        # the second tree hangs below the kept nodes (or the new prefix end)
        shifted = [-1 if p < 0 else p + len(keep) for p in more_parents]
        if keep:
            shifted[0] = data.draw(st.integers(0, len(keep) - 1))
        second.append(ForwardRequest(f"s{i}", more, shifted))
    for a, b in zip(ref.forward(second), paged.forward(second), strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_query_intervals_see_exactly_the_ancestors():
    parents = [-1, 0, 0, 1, -1, 3, 2, 5]  # a forest; the pass's queries are nodes 3..7
    order, lo, hi = query_intervals(parents, first=3)
    assert sorted(order) == [3, 4, 5, 6, 7]
    for row, q in enumerate(order):
        ancestors, node = set(), q
        while node >= 0:
            ancestors.add(node)
            node = parents[node]
        assert {a for a in range(len(parents)) if lo[a] <= row < hi[a]} == ancestors


def test_a_commit_is_a_page_table_update_and_rejected_nodes_free_their_slots(model):
    runner = PagedRunner(model, kv_tokens=4 * EXTENT, max_scratch=64, prefill_chunk=64)
    runner.open("a")
    runner.prefill("a", list(range(10, 30)))
    pool_before = [k.clone() for k in runner.k_cache]
    runner.forward([ForwardRequest("a", [1, 2, 3, 4, 5], [-1, 0, 0, 1, 3])])
    session = runner.sessions["a"]
    tree_slots = list(session.scratch_slots)
    free_before = len(session.table.free)
    written = [k.clone() for k in runner.k_cache]
    runner.commit("a", [0, 1], keep=[3])
    # the path's K/V stays where it was written: no copy, only the page table grows
    assert session.table.committed[-2:] == [tree_slots[0], tree_slots[1]]
    assert session.scratch_slots == [tree_slots[3]]
    assert len(session.table.free) == free_before + 2  # nodes 2 and 4, rejected, are free at once
    for k, w in zip(runner.k_cache, written, strict=True):
        assert torch.equal(k, w)
    assert any(not torch.equal(k, b) for k, b in zip(runner.k_cache, pool_before, strict=True))


def test_sessions_of_mixed_lengths_fill_the_pool_before_a_clear_refusal(model):
    """Admission by free slots: sessions of random lengths join until the pool refuses one;
    by then ≥ 90% of its slots hold tokens, and the refusal changes nothing."""
    verifier = Verifier(model, max_len=2048, kv_tokens=16384, max_tree_nodes=32)
    gen = torch.Generator().manual_seed(7)
    admitted, refused = 0, 0
    for i in range(200):
        length = int(torch.randint(20, 1000, (1,), generator=gen))
        if not verifier.runner.can_hold(length):
            refused += 1
            if refused == 3:
                break
            continue
        verifier.open(f"s{i}", torch.randint(3, 4000, (length,), generator=gen).tolist(), SamplingSpec())
        admitted += 1
    pool = verifier.runner.pool
    used = sum(len(t.committed) for t in pool.tables.values())
    assert used >= 0.9 * pool.n_slots, (used, pool.n_slots, admitted)
    with pytest.raises(CacheFullError):
        verifier.open("late", list(range(5, 5 + 4 * EXTENT)), SamplingSpec())
    assert "late" not in verifier.sessions and "late" not in pool.tables
    assert sum(len(t.committed) for t in pool.tables.values()) == used  # nothing lost


def test_the_memory_plan_admits_64_sessions_of_4k_tokens_of_qwen3_14b_in_80_gib():
    config = AutoConfig.for_model("qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408,
                                  num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                                  head_dim=128, tie_word_embeddings=False)
    weights = 14_768_307_200 * 2  # Qwen3-14B's parameters in bf16
    kv_plan = plan(config, model="qwen3-14b", dtype="bfloat16", weights_bytes=weights, kv_cache_memory=0.9,
                   device_memory_bytes=80 << 30)
    assert kv_plan.kv_bytes_per_token == 160 * 1024
    assert kv_plan.sessions_at["4096"] >= 64
    pool = SlotPool(kv_plan.kv_tokens)
    for i in range(64):  # 4k of context and a 33-node tree each
        pool.open(f"s{i}")
        pool.commit(f"s{i}", pool.allocate(f"s{i}", 4096))
        pool.allocate(f"s{i}", 33)
    assert kv_plan.weights_bytes + kv_plan.activation_reserve_bytes + kv_plan.kv_bytes <= 0.9 * (80 << 30)


def test_a_verify_pass_makes_one_device_to_host_transfer(model):
    """Counted with a hook around every tensor method that copies to the host."""
    verifier = Verifier(model, max_sessions=4, max_len=256)
    gen = torch.Generator().manual_seed(3)
    for i in range(4):
        params = SamplingSpec() if i % 2 else SamplingSpec(temperature=0.8, top_p=0.9, top_k=50, seed=i)
        verifier.open(f"s{i}", torch.randint(3, 4000, (40 + 9 * i,), generator=gen).tolist(), params)
    trees = [DraftTreeMsg(session_id=f"s{i}", cycle=0, committed_len=40 + 9 * i, tokens=[5, 6, 7, 8],
                          parents=[-1, 0, 0, 2]) for i in range(4)]
    with count_host_transfers() as transfers:
        results = verifier.verify(trees)
    assert transfers == ["tolist"]
    # and the batched rule agrees with the plain one, tree by tree
    assert len(results) == 4


def test_batched_acceptance_equals_the_plain_rule_on_hostile_trees():
    from specedge.engine.acceptance import accept_batch

    gen = torch.Generator().manual_seed(11)
    trees, params, roots, logits = [], [], [], []
    for i in range(20):
        n = int(torch.randint(0, 9, (1,), generator=gen))
        parents = [int(torch.randint(-1, j, (1,), generator=gen)) for j in range(n)]
        tokens = torch.randint(0, 6, (n,), generator=gen).tolist()  # a tiny vocabulary: repeats and hits
        trees.append((tokens, parents))
        params.append(SamplingSpec() if i % 3 == 0 else SamplingSpec(temperature=1.3, top_k=i % 4, seed=i))
        roots.append(50 + i)
        logits.append(torch.randn(1 + n, 6, generator=gen) * 3)
    batched = accept_batch(trees, torch.cat(logits), params, roots)
    plain = [accept(t, p, x, sp, r) for (t, p), x, sp, r in zip(trees, logits, params, roots, strict=True)]
    assert batched == plain


def test_a_long_prompt_is_prefilled_in_chunks_that_ride_along_with_verifications(model):
    """A 4k-token prompt arriving while 8 sessions verify: every pass carries one chunk of it
    beside their trees, and its cache then equals a prefill done alone (its next token is the
    same). The time it adds to their steps is `specedge bench-verify --prefill-arrival 4096`'s."""
    verifier = Verifier(model, max_sessions=10, max_len=4500, max_tree_nodes=32)
    gen = torch.Generator().manual_seed(5)
    for i in range(8):
        verifier.open(f"s{i}", torch.randint(3, 4000, (300,), generator=gen).tolist(), SamplingSpec())
    parents = [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    prompt = torch.randint(3, 4000, (4096,), generator=gen).tolist()
    verifier.begin("long", prompt, SamplingSpec())
    passes = 0
    while verifier.prefilling("long"):
        trees = [DraftTreeMsg(session_id=f"s{i}", cycle=verifier.sessions[f"s{i}"].cycle,
                              committed_len=len(verifier.sessions[f"s{i}"].committed),
                              tokens=torch.randint(3, 4000, (12,), generator=gen).tolist(), parents=parents)
                 for i in range(8)]
        assert len(verifier.step(trees, verifier.prefill_chunk)) == 8  # every tree verified beside the chunk
        passes += 1
    assert passes == -(-4095 // verifier.prefill_chunk)  # one chunk per pass
    alone = PagedRunner(model, kv_tokens=5000, max_scratch=256)
    alone.open("x")
    alone.prefill("x", prompt[:-1])
    probe = DraftTreeMsg(session_id="long", cycle=0, committed_len=4096, tokens=[7], parents=[-1])
    result = verifier.verify([probe])[0]
    expected = alone.forward([ForwardRequest("x", [prompt[-1], 7], [-1, 0])])[0].argmax(-1).tolist()
    assert [*result.accepted, result.bonus] in ([expected[0]], [7, expected[1]])


def test_a_drafting_pass_makes_one_device_to_host_transfer():
    """The edge's drafter grows its trees on the same paged engine, with the same budget:
    one transfer per draft pass (the pass's candidates, all rows at once)."""
    from specedge.engine.parties import Drafter
    from specedge.engine.tree import TreeParams
    from specedge.models import BUNDLED_DRAFT

    draft = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_DRAFT)).eval()
    drafter = Drafter(draft, TreeParams(budget=16, depth=3, branch=4, beams=8), max_sessions=6, max_len=512)
    assert isinstance(drafter.runner, PagedRunner)
    for i in range(6):
        drafter.open(f"d{i}", list(range(20 + i, 60 + i)))
    drafter.draft_many(["d3", "d4", "d5"])  # warm up: compiling the kernel reads tensors too
    passes = drafter.stats.forward_passes
    with count_host_transfers() as calls:
        trees = drafter.draft_many(["d0", "d1", "d2"])
    assert all(len(t.tokens) == 16 for t in trees)
    assert len(calls) == drafter.stats.forward_passes - passes == 4  # the roots' pass and 3 levels


def test_a_config_alone_gives_a_model_of_that_shape_with_random_weights(tmp_path):
    """`--target config.json` (or a built-in shape such as qwen3-14b): random weights in the
    asked dtype, straight on the device, no tokenizer; the engine runs it."""
    import json

    from specedge.engine.loading import load_causal_lm
    from specedge.engine.shapes import QWEN3_SHAPES, shape_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen3", "vocab_size": 512, "hidden_size": 64,
                                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 16}))
    loaded = load_causal_lm(str(path), dtype="bfloat16")
    assert loaded.tokenizer is None and loaded.tokenizer_fingerprint.startswith("random:")
    assert loaded.model.config.num_key_value_heads == 2 and next(loaded.model.parameters()).dtype == torch.bfloat16
    runner = PagedRunner(loaded.model, kv_tokens=2 * EXTENT)
    runner.open("r")
    assert runner.forward([ForwardRequest("r", [1, 2, 3], [-1, 0, 1])])[0].shape == (3, 512)
    big = shape_config("qwen3-14b")
    assert (big.num_hidden_layers, big.hidden_size, big.num_attention_heads, big.num_key_value_heads,
            big.intermediate_size, big.vocab_size) == (40, 5120, 40, 8, 17408, 151936)
    assert set(QWEN3_SHAPES) >= {"qwen3-0.6b", "qwen3-14b"}
