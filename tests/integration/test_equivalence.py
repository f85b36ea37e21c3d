"""Exactness, the product's promise: every mode's greedy output is token for token what
`transformers`' `generate(do_sample=False)` of the target alone produces, on 20 Spec-Bench
prompts (first turn, chat template, 64 new tokens); seeded sampling is identical across
the three modes (here on CUDA; on CPU `test_exact_serving.py` checks every mode bit for bit
against the autoregressive mode in bf16, served).

Tolerance policy: the comparison is exact (token ids). On CPU the models run in float32.
On CUDA (skipped without a GPU) the models run in their default dtype on both sides; the
greedy comparison is still exact, because both sides compute in the same dtype and a
near-tie that flips one argmax would show up as a failing prompt to investigate, not be
hidden by a tolerance.
"""

import json
import pathlib

import pytest
import torch

from specedge.engine.generate import MODES, generate
from specedge.engine.loading import load_causal_lm
from specedge.engine.parties import Drafter, Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import TreeParams
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled
from tests.conftest import REPO

PROMPTS_FILE = REPO.parent / "shared" / "data" / "specbench_prompts.jsonl"
BENCH_COPY = REPO / "libs" / "specedge" / "data" / "specbench_prompts.jsonl"
NEW_TOKENS = 64


def sample_prompts(n: int = 20) -> list[str]:
    path = BENCH_COPY if BENCH_COPY.exists() else PROMPTS_FILE
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    step = len(rows) // n
    return [rows[i * step]["turns"][0] for i in range(n)]  # spread over every category


def devices() -> list[str]:
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU")])]


@pytest.fixture(scope="module", params=devices())
def engine(request):
    target = load_causal_lm(bundled(BUNDLED_TARGET), device=request.param)
    draft = load_causal_lm(bundled(BUNDLED_DRAFT), device=request.param)
    verifier = Verifier(target.model)
    drafter = Drafter(draft.model, TreeParams(budget=32, depth=4, branch=16, beams=32))
    eos = set(target.model.generation_config.eos_token_id)
    prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                    add_generation_prompt=True, tokenize=False)
               for text in sample_prompts()]
    ids = [target.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return target, verifier, drafter, eos, ids


def test_greedy_output_of_every_mode_equals_transformers_generate(engine):
    target, verifier, drafter, eos, prompts = engine
    mismatches = []
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            reference = target.model.generate(torch.tensor([ids], device=target.device), do_sample=False,
                                               max_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
        for mode in MODES:
            out = generate(mode, verifier, drafter, ids, SamplingSpec(), NEW_TOKENS, eos)
            if out.token_ids != reference:
                mismatches.append((i, mode, out.token_ids, reference))
    assert not mismatches, mismatches[:2]


def test_seeded_sampling_is_identical_across_modes(engine):
    if engine[0].device.type == "cpu":  # bit for bit in bf16, every mode, served: test_exact_serving.py
        pytest.skip("covered on CPU by tests/integration/test_exact_serving.py")
    _, verifier, drafter, eos, prompts = engine
    for seed, ids in enumerate(prompts):
        params = SamplingSpec(temperature=0.7, top_p=0.9, top_k=50, seed=seed)
        outputs = {mode: generate(mode, verifier, drafter, ids, params, NEW_TOKENS, eos).token_ids
                   for mode in MODES}
        assert outputs["server-only"] == outputs["autoregressive"] == outputs["specedge"], seed
        assert len(outputs["specedge"]) > 0


def test_specedge_mode_exchanges_only_compact_messages_and_drafts_proactively(engine):
    _, verifier, drafter, eos, prompts = engine
    out = generate("specedge", verifier, drafter, prompts[0], SamplingSpec(), NEW_TOKENS, eos,
                   one_way_delay_s=0.005)
    assert out.proactive_attempts == out.num_verifies
    assert out.proactive_hit_rate is not None
    # ~ a few bytes per drafted node: token id and parent index, no masks, no floats
    assert out.wire_bytes_to_verifier / out.num_verifies < 32 * 6 + 64
