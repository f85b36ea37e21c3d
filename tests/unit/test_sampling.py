"""Counter-based sampling: same (seed, position) -> same token; filters behave."""

import pytest
import torch

from specedge.engine.sampling import SamplingSpec, filtered_probs, sample, uniform
from specedge.protocol import GREEDY_BELOW


def test_uniform_is_a_function_of_seed_and_position():
    assert uniform(1, 5) == uniform(1, 5)
    assert len({uniform(1, p) for p in range(1000)}) == 1000
    assert uniform(1, 5) != uniform(2, 5)
    values = torch.tensor([uniform(9, p) for p in range(20000)])
    assert 0 <= values.min() and values.max() < 1
    assert abs(values.mean().item() - 0.5) < 0.01


def test_greedy_is_argmax_and_first_index_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert sample(logits, SamplingSpec(), [0]).tolist() == [1]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert (filtered_probs(logits, SamplingSpec(temperature=1, top_k=2))[0] > 0).tolist() == \
        [True, True, False, False, False]
    p = torch.softmax(logits[0], -1)
    top_p = float(p[0] + p[1] / 2)  # nucleus must include token 1 to reach it
    assert (filtered_probs(logits, SamplingSpec(temperature=1, top_p=top_p))[0] > 0).tolist() == \
        [True, True, False, False, False]
    assert torch.allclose(filtered_probs(logits, SamplingSpec(temperature=1)).sum(), torch.tensor(1.0).double())


def test_same_position_same_token_across_batches():
    params = SamplingSpec(temperature=1.0, seed=5)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    together = sample(logits, params, [10, 11, 12, 13]).tolist()
    apart = [sample(logits[i : i + 1], params, [10 + i]).item() for i in range(4)]
    assert together == apart


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingSpec(**bad)


@pytest.mark.parametrize("temperature", [1e-310, 1e-8, 9e-6])
def test_a_temperature_near_zero_is_greedy_not_nan(temperature):
    """Dividing by 1e-310 overflows to inf and NaN; below GREEDY_BELOW the draw is the argmax."""
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0], [1.0, 1.0, 0.0, 4.0]])
    params = SamplingSpec(temperature=temperature, seed=11)
    assert params.greedy
    assert sample(logits, params, [0, 1]).tolist() == [1, 3]
    assert not SamplingSpec(temperature=GREEDY_BELOW, seed=11).greedy


def test_a_draw_is_the_inverse_cdf_at_the_counter_based_uniform():
    """Against a plain-Python inverse CDF (math.exp, a running sum), not the module itself:
    the token drawn at (seed, position) is the first whose cumulative probability exceeds
    `uniform(seed, position)`, and over many positions the draws follow the distribution."""
    import math

    logits = torch.tensor([[2.0, 0.5, -1.0, 1.5, 0.0]], dtype=torch.float64)
    temperature = 0.8
    weights = [math.exp(x / temperature) for x in logits[0].tolist()]
    probs = [w / sum(weights) for w in weights]
    counts = [0] * len(probs)
    for position in range(4000):
        u, running, expected = uniform(42, position), 0.0, len(probs) - 1
        for token, p in enumerate(probs):
            running += p
            if running > u:
                expected = token
                break
        drawn = sample(logits, SamplingSpec(temperature=temperature, seed=42), [position]).item()
        assert drawn == expected, position
        counts[drawn] += 1
    assert all(abs(c / 4000 - p) < 0.03 for c, p in zip(counts, probs, strict=True))


def test_penalties_and_bias_follow_vllms_rules():
    from specedge.engine.sampling import adjust_rows

    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    params = SamplingSpec(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.1, logit_bias={1: 1.0})
    out = adjust_rows(logits, [params], [([0], [2, 2, 3])])
    # bias: [1, 0, 2, .5]; repetition over prompt and output {0, 2, 3}: [.5, 0, 1, .25];
    # then frequency × count + presence for output tokens: 2 (twice) and 3 (once)
    assert torch.allclose(out, torch.tensor([[0.5, 0.0, -0.1, -0.35]]))
    assert torch.equal(logits, torch.tensor([[1.0, -1.0, 2.0, 0.5]]))  # not in place
    plain = torch.randn(3, 4)
    assert adjust_rows(plain, [SamplingSpec()] * 3, [None] * 3) is plain  # nothing asked: nothing copied


def test_min_p_keeps_tokens_at_least_that_share_of_the_most_likely():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = filtered_probs(logits, SamplingSpec(temperature=1.0, min_p=0.25))
    assert probs[0, 3] == 0 and probs[0, 2] > 0 and abs(probs.sum().item() - 1) < 1e-12


def test_min_tokens_keeps_the_end_ids_out_until_the_output_is_long_enough():
    from specedge.engine.sampling import adjust_rows

    logits = torch.tensor([[0.0, 5.0, 1.0]] * 2)
    params = SamplingSpec(min_tokens=3, end_ids=[1])
    out = adjust_rows(logits, [params] * 2, [([7], [2, 2]), ([7], [2, 2, 2])])
    assert out[0, 1] == float("-inf") and out[1, 1] == 5.0  # two output tokens: not yet; three: free
    assert not SamplingSpec(min_tokens=3).adjusts  # nothing to keep out
