"""The discrete-event simulator driving the real scheduling policy: the paper's setting
reproduced and beaten, pipeline-aware scheduling never worse than FIFO or the reference's
two groups and better where verification cost grows with batch × nodes, 1000 edges fast."""

import time

import pytest

from specedge_bench import simulator as sim
from specedge_scheduler.policy import SchedulingPolicy

PAPER = sim.PRESETS["paper-14b-0.6b"]


@pytest.fixture(scope="module")
def paper_runs():
    return sim.compare(PAPER, [1, 2, 4, 8, 16], sim_s=60)


def by(runs, batch, mode, strategy=""):
    return next(r for r in runs if (r.batch_size, r.mode, r.strategy) == (batch, mode, strategy))


@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16])
def test_paper_preset_pipeline_keeps_the_server_busy_and_doubles_server_only(paper_runs, batch):
    pipeline, server_only = by(paper_runs, batch, "specedge", "pipeline"), by(paper_runs, batch, "server-only")
    assert pipeline.server_utilization >= 0.95
    assert pipeline.server_throughput_tok_s >= 2.2 * server_only.server_throughput_tok_s
    if batch <= 4:  # beyond, 2 × batch edges at $0.35/h each (waiting counted) cost more than they save
        assert pipeline.cost_per_1k_tokens_usd < server_only.cost_per_1k_tokens_usd
    assert pipeline.itl_ms_mean < server_only.itl_ms_mean


def test_paper_preset_pipeline_beats_fifo_and_two_groups(paper_runs):
    gains = []
    for batch in (1, 2, 4, 8, 16):
        pipeline = by(paper_runs, batch, "specedge", "pipeline").server_throughput_tok_s
        others = max(by(paper_runs, batch, "specedge", s).server_throughput_tok_s for s in ("fifo", "two-groups"))
        assert pipeline >= 0.99 * others, batch  # never worse (beyond simulation noise)
        gains.append(pipeline / others)
    assert max(gains) >= 1.10  # and clearly better once verification is compute-bound (batch 16)


def test_this_machine_preset_shrinks_trees_when_verification_is_compute_bound():
    preset = sim.PRESETS["this-machine"]
    fifo = sim.simulate_specedge(preset, "fifo", 16, sim_s=20)
    pipeline = sim.simulate_specedge(preset, "pipeline", 16, sim_s=20)
    assert pipeline.mean_budget < preset.budget / 2
    assert pipeline.server_throughput_tok_s > 2 * fifo.server_throughput_tok_s


def test_a_thousand_edges_simulate_in_seconds():
    started = time.perf_counter()
    run = sim.simulate_specedge(PAPER, "pipeline", batch_size=500, edges=1000, sim_s=10)
    assert time.perf_counter() - started < 120  # seconds here; the bound leaves room for a loaded machine
    assert run.edges == 1000 and run.server_throughput_tok_s > 0 and run.server_utilization > 0.5


def test_acceptance_model_matches_the_preset_and_grows_with_the_tree():
    assert sim.expected_tokens(PAPER, 32, 4) == pytest.approx(PAPER.tokens_per_verify_edge)
    by_budget = [sim.expected_tokens(PAPER, b, 4) for b in (4, 8, 16, 32, 64)]
    assert by_budget == sorted(by_budget) and by_budget[0] > 1
    assert sim.expected_tokens(PAPER, 32, 1) < sim.expected_tokens(PAPER, 32, 2)
    alpha = sim.level_acceptance(4.0, 4)
    assert sum(alpha ** k for k in range(5)) == pytest.approx(4.0, abs=1e-6)


def test_runs_are_reproducible_for_a_seed():
    a = sim.simulate_specedge(PAPER, "pipeline", 4, sim_s=5, seed=3)
    b = sim.simulate_specedge(PAPER, "pipeline", 4, sim_s=5, seed=3)
    assert a == b


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        SchedulingPolicy(strategy="random")


def test_the_fleet_scales_with_verifiers_through_several_live_scheduler_cores():
    from specedge_bench.fleet import simulate_fleet

    preset = sim.PRESETS["paper-14b-0.6b"]
    one = simulate_fleet(preset, verifiers=1, schedulers=2, edges=60, sim_s=4)
    four = simulate_fleet(preset, verifiers=4, schedulers=2, edges=240, sim_s=4)
    assert one.throughput_tok_s > 0 and one.verifier_utilization > 0.8
    assert four.throughput_tok_s >= 0.9 * 4 * one.throughput_tok_s
    assert 0 < four.scheduler_utilization < 0.5 and four.core_cpu_per_draft_us > 0
    # a scheduler that costs too much per draft becomes the bottleneck, as a live one would
    slow = simulate_fleet(preset, verifiers=4, schedulers=1, edges=240, sim_s=4, cpu_per_draft_s=0.01)
    assert slow.scheduler_utilization > 0.9 and slow.throughput_tok_s < 0.7 * four.throughput_tok_s
