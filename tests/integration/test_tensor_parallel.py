"""A target over two tensor-parallel ranks (`torch.distributed`, gloo on CPU) verifies
exactly as one: the same logits bit for bit, the same committed tokens, greedy and
seeded, over trees of every shape, several sessions per pass and chunked prefill."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from specedge.engine.parties import Verifier, follow_verifier
from specedge.engine.sampling import SamplingSpec
from specedge.launcher import free_port
from specedge.models import BUNDLED_TARGET, bundled
from specedge.protocol import DraftTreeMsg

SETTINGS = {"max_sessions": 4, "max_len": 512, "max_tree_nodes": 32}


def target():
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET), dtype=torch.float32).eval()


def scenario(verifier: Verifier) -> tuple[list, list[torch.Tensor]]:
    """Three sessions (greedy, seeded, greedy) with prompts prefilled in chunks, then six
    passes of random trees; returns every result and every logit the passes computed."""
    logits: list[torch.Tensor] = []
    forward = verifier.runner.forward

    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        logits.append(out.clone() if isinstance(out, torch.Tensor) else [o.clone() for o in out])
        return out

    verifier.runner.forward = recorded
    gen = torch.Generator().manual_seed(3)
    vocab = verifier.vocab_size
    params = [SamplingSpec(), SamplingSpec(temperature=0.8, top_p=0.9, seed=5), SamplingSpec()]
    for i, p in enumerate(params):
        verifier.begin(f"s{i}", torch.randint(0, vocab, (40 + 17 * i,), generator=gen).tolist(), p)
    results = []
    for _ in range(6):
        while any(verifier.prefilling(f"s{i}") for i in range(3)):
            verifier.step([], prefill_budget=24)
        trees = []
        for i in range(3):
            session = verifier.sessions[f"s{i}"]
            n = int(torch.randint(0, 12, (1,), generator=gen))
            parents = [int(torch.randint(-1, j, (1,), generator=gen)) for j in range(n)]
            tokens = torch.randint(0, vocab, (n,), generator=gen).tolist()
            trees.append(DraftTreeMsg(session_id=f"s{i}", cycle=session.cycle, committed_len=len(session.committed),
                                      tokens=tokens, parents=parents))
        results += verifier.verify(trees)
    return results, logits


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from specedge.engine import tensor_parallel as tp

    tp.init(rank, world, f"tcp://127.0.0.1:{port}", "cpu")
    model = target()
    try:
        if rank == 0:
            verifier = Verifier(model, tensor_parallel=True, **SETTINGS)
            results, logits = scenario(verifier)
            verifier.stop_followers()
            with open(out, "wb") as f:
                pickle.dump((results, logits), f)
        else:
            assert follow_verifier(model, **SETTINGS) > 0
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(600)
def test_two_gloo_ranks_verify_exactly_as_one(tmp_path):
    out = str(tmp_path / "rank0.pkl")
    mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
    with open(out, "rb") as f:
        parallel, parallel_logits = pickle.load(f)
    single, single_logits = scenario(Verifier(target(), **SETTINGS))
    assert parallel == single
    assert len(parallel_logits) == len(single_logits) > 6
    for a, b in zip(parallel_logits, single_logits, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else all(map(torch.equal, a, b))
    assert sum(len(r.accepted) for r in single) >= 0 and len(single) == 18


async def test_a_verifier_over_two_ranks_serves_exactly_the_targets_output(nats_url, redis_url, cli_env, tmp_path):
    import asyncio

    from tests.helpers import registered, start_cli, stop_all, wait_for
    from tests.sessions import one_session

    procs = {
        "verifier": start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "1024",
                               "--tensor-parallel", "2", "--name", "tp-verifier"], cli_env, tmp_path / "verifier.log"),
        "scheduler": start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url], cli_env,
                               tmp_path / "scheduler.log"),
    }
    try:
        for role, proc in procs.items():
            await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(nats_url, r, p.pid), 120, role)
        assert "tensor parallel over 2 ranks" in (tmp_path / "verifier.log").read_text()
        for prompt, mode in (("Explain what a hash map is.", "autoregressive"), ("Sort a list in Python.", "specedge")):
            opened, tokens, reference = await one_session(nats_url, prompt, 24, mode=mode)
            assert opened.error is None and tokens == reference, mode
    finally:
        stop_all(procs, tmp_path)
