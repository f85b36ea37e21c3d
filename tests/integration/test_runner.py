"""The model runner against transformers' own forward of the same model, and its cache rules."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from specedge.engine.runner import CacheFullError, ForwardRequest, ModelRunner
from specedge.models import BUNDLED_TARGET, bundled

ATOL = 1e-4  # float32 on CPU; observed differences are ~1e-5


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def chain(n: int) -> list[int]:
    return list(range(-1, n - 1))


def test_plain_sequence_matches_transformers(model):
    ids = torch.randint(0, 4096, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    runner = ModelRunner(model, max_sessions=2, max_len=256)
    runner.open("a")
    out = runner.forward([ForwardRequest("a", ids, chain(len(ids)))])[0]
    torch.testing.assert_close(out, hf_logits(model, ids), atol=ATOL, rtol=0)


def test_tree_matches_transformers_on_every_path(model):
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 4096, (30,), generator=gen).tolist()
    tokens = torch.randint(0, 4096, (9,), generator=gen).tolist()
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 6]  # a branching tree, parents first
    runner = ModelRunner(model, max_sessions=2, max_len=256)
    runner.open("t")
    runner.prefill("t", prefix)
    out = runner.forward([ForwardRequest("t", tokens, parents)])[0]
    for node in range(len(tokens)):
        path, i = [], node
        while i >= 0:
            path.insert(0, tokens[i])
            i = parents[i]
        torch.testing.assert_close(out[node], hf_logits(model, prefix + path)[-1], atol=ATOL, rtol=0)


def test_batch_of_8_sessions_with_different_lengths_equals_8_separate_forwards(model):
    gen = torch.Generator().manual_seed(2)
    lengths = [3, 17, 40, 8, 64, 25, 1, 33]
    prefixes = [torch.randint(0, 4096, (n,), generator=gen).tolist() for n in lengths]
    trees = [(torch.randint(0, 4096, (k,), generator=gen).tolist(), [-1] + [j // 2 for j in range(k - 1)])
             for k in (1, 5, 3, 7, 2, 6, 4, 5)]
    batched = ModelRunner(model, max_sessions=8, max_len=256)
    for i, prefix in enumerate(prefixes):
        batched.open(f"s{i}")
        batched.prefill(f"s{i}", prefix)
    together = batched.forward([ForwardRequest(f"s{i}", t, p) for i, (t, p) in enumerate(trees)])
    for i, (prefix, (tokens, parents)) in enumerate(zip(prefixes, trees, strict=True)):
        alone = ModelRunner(model, max_sessions=1, max_len=256)
        alone.open("x")
        alone.prefill("x", prefix)
        torch.testing.assert_close(together[i], alone.forward([ForwardRequest("x", tokens, parents)])[0],
                                   atol=ATOL, rtol=0)


def test_commit_keeps_the_accepted_path_contiguous(model):
    ids = torch.randint(0, 4096, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    runner = ModelRunner(model, max_sessions=1, max_len=256)
    runner.open("c")
    runner.prefill("c", ids[:20])
    # tree: the true continuation on one branch, junk on others
    tokens = [ids[20], 7, ids[21], 9, ids[22]]
    parents = [-1, 0, 0, 2, 2]
    runner.forward([ForwardRequest("c", tokens, parents)])
    runner.commit("c", [0, 2, 4])
    cache = runner.sessions["c"]
    assert (cache.prefix_len, cache.n_scratch) == (23, 0)
    out = runner.forward([ForwardRequest("c", ids[23:30], chain(7))])[0]
    torch.testing.assert_close(out, hf_logits(model, ids[:30])[23:30], atol=ATOL, rtol=0)


def test_commit_can_keep_a_subtree_below_the_path(model):
    ids = torch.randint(0, 4096, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    runner = ModelRunner(model, max_sessions=1, max_len=256)
    runner.open("k")
    runner.prefill("k", ids[:10])
    runner.forward([ForwardRequest("k", [ids[10], ids[11], 5], [-1, 0, 0])])
    runner.forward([ForwardRequest("k", [ids[12], ids[13], 6], [1, 3, 3])])  # subtree below node 1
    runner.commit("k", [0, 1], keep=[3, 4])
    cache = runner.sessions["k"]
    assert (cache.prefix_len, cache.parents) == (12, [-1, 0])
    out = runner.forward([ForwardRequest("k", [ids[14]], [1])])[0]
    torch.testing.assert_close(out[0], hf_logits(model, ids[:15])[-1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="not a chain"):
        runner.commit("k", [1])


def test_capacity_eviction_and_bad_requests(model):
    runner = ModelRunner(model, max_sessions=2, max_len=16, max_scratch=8, prefill_chunk=8)
    runner.open("a")
    runner.open("b")
    assert runner.free_slots == 0
    with pytest.raises(CacheFullError):
        runner.open("c")
    runner.evict("b")
    assert runner.free_slots == 1
    runner.open("c")
    runner.prefill("a", list(range(12)))
    assert runner.free_positions("a") == 4
    with pytest.raises(CacheFullError):
        runner.forward([ForwardRequest("a", list(range(5)), chain(5))])
    with pytest.raises(ValueError, match="earlier node"):
        runner.forward([ForwardRequest("c", [1, 2], [-1, 5])])
    assert runner.sessions["c"].n_scratch == 0  # a refused request changes nothing


def test_long_prompt_prefill_in_chunks_matches_transformers(model):
    ids = torch.randint(0, 4096, (600,), generator=torch.Generator().manual_seed(5)).tolist()
    runner = ModelRunner(model, max_sessions=1, max_len=1024, prefill_chunk=256)
    runner.open("p")
    last = runner.prefill("p", ids)
    assert runner.sessions["p"].prefix_len == 600
    torch.testing.assert_close(last, hf_logits(model, ids)[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_other_families_load_and_match_transformers(family, tmp_path):
    """Qwen2 (biased q/k/v, no q/k norm) and Llama load through the engine and run exactly."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers import AutoModelForCausalLM as Auto

    from specedge.engine.loading import load_causal_lm

    config = AutoConfig.for_model(family, vocab_size=4096, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512)
    torch.manual_seed(0)
    Auto.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET)).save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path))
    assert loaded.model.config.model_type == family
    ids = list(range(10, 40))
    runner = ModelRunner(loaded.model, max_sessions=1, max_len=128)
    runner.open("f")
    runner.prefill("f", ids[:20])
    out = runner.forward([ForwardRequest("f", ids[20:25] + [3], [-1, 0, 1, 2, 3, 1])])[0]
    reference = hf_logits(loaded.model, ids[:25])
    torch.testing.assert_close(out[:5], reference[20:25], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[5], hf_logits(loaded.model, ids[:22] + [3])[-1], atol=ATOL, rtol=0)
