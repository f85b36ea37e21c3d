"""The exact runner's promise, bit for bit: a tree node's logits are `torch.equal` to those
the same engine computes for that token alone, in a single-token pass at the same position
— whatever the tree (1–64 nodes, depth up to 8), whichever sessions share the pass (0–15
others: trees and prompt chunks of random lengths), however the cache was prefilled (random
chunk sizes) and after an eviction and a re-prefill; in float32 and in bfloat16."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specedge.engine import invariant
from specedge.engine.exact_runner import ExactRunner
from specedge.engine.kv_pool import EXTENT
from specedge.engine.loading import load_causal_lm
from specedge.engine.runner import ForwardRequest
from specedge.models import BUNDLED_TARGET, bundled

VOCAB = 4096
MAX_LEN = 640


def engines() -> list:
    cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
    return [pytest.param((device, dtype), id=f"{device}-{dtype}", marks=cuda if device == "cuda" else [])
            for device in ("cpu", "cuda") for dtype in ("float32", "bfloat16")]


@pytest.fixture(scope="module", params=engines())
def model(request):
    device, dtype = request.param
    return load_causal_lm(bundled(BUNDLED_TARGET), device, dtype).model


def runner(model, sessions: int, chunk: int) -> ExactRunner:
    return ExactRunner(model, kv_tokens=(sessions + 2) * (MAX_LEN + 2 * EXTENT), max_len=MAX_LEN, max_scratch=320,
                       prefill_chunk=chunk)


@st.composite
def trees(draw, max_nodes=64, max_depth=8):
    """A draft tree: one root, every other node below an earlier one, at most `max_depth` deep."""
    n = draw(st.integers(1, max_nodes))
    parents, depth = [-1], [0]
    for _ in range(1, n):
        parent = draw(st.sampled_from([i for i, d in enumerate(depth) if d < max_depth - 1] or [0]))
        parents.append(parent)
        depth.append(depth[parent] + 1)
    return draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)), parents


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prompt_len=st.integers(1, 300), tree=trees(),
       others=st.lists(st.tuples(st.integers(1, 300), st.booleans(), trees(max_nodes=24)), max_size=15),
       chunks=st.tuples(st.integers(1, 200), st.integers(1, 200)), reprefill=st.booleans(), seed=st.integers(0, 99))
def test_every_node_equals_its_single_token_pass(model, prompt_len, tree, others, chunks, reprefill, seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(VOCAB) for _ in range(prompt_len)]
    tokens, parents = tree
    batched = runner(model, len(others) + 1, chunks[0])
    batched.open("s")
    batched.prefill("s", prompt)
    if reprefill:  # evicted, then prefilled again from its tokens in other chunks
        batched.evict("s")
        batched.prefill_chunk = chunks[1]
        batched.open("s")
        batched.prefill("s", prompt)
    requests = [ForwardRequest("s", tokens, parents)]
    for i, (length, is_tree, (other_tokens, other_parents)) in enumerate(others):
        batched.open(f"o{i}")
        context = [rng.randrange(VOCAB) for _ in range(length)]
        if is_tree:  # another session's tree
            batched.prefill(f"o{i}", context)
            requests.append(ForwardRequest(f"o{i}", other_tokens, other_parents))
        else:  # another session's prompt chunk
            requests.append(ForwardRequest(f"o{i}", context, list(range(-1, length - 1))))
    rng.shuffle(requests)
    logits = batched.forward(requests)[[r.session_id for r in requests].index("s")]

    # the reference: every node's ancestors committed, then the node alone in its pass
    alone = runner(model, 1, chunks[1])
    for parent in sorted(set(parents)):
        path, node = [], parent
        while node >= 0:
            path.insert(0, tokens[node])
            node = parents[node]
        alone.open("r")
        alone.prefill("r", prompt + path)
        for node in (i for i, p in enumerate(parents) if p == parent):
            single = alone.forward([ForwardRequest("r", [tokens[node]], [-1])])[0][0]
            assert torch.equal(single, logits[node]), (node, (single - logits[node]).abs().max().item())
            alone.rollback_scratch("r")
        alone.evict("r")


def test_products_pad_rows_and_keep_every_row_bit_for_bit():
    """The matrix product underneath: a row's result is the same alone and among others."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(96, 256, generator=gen).to(dtype)
        rows = torch.randn(70, 256, generator=gen).to(dtype)
        every = invariant.linear(rows, weight)
        for start, count in ((0, 1), (5, 3), (17, 9), (0, 70), (33, 16)):
            assert torch.equal(invariant.linear(rows[start:start + count], weight), every[start:start + count])


def test_silu_is_the_same_wherever_a_value_sits():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 8
    whole = invariant.silu(x)
    assert all(torch.equal(invariant.silu(x[i:i + n]), whole[i:i + n]) for i, n in ((0, 1), (7, 3), (123, 45)))
    torch.testing.assert_close(whole, torch.nn.functional.silu(x))
