"""`specedge bench` end to end: the real system, modes side by side, a report, results and plots."""

import json
import subprocess

import pytest

from tests.conftest import SPECEDGE

pytestmark = pytest.mark.e2e
KEYS = {"mode", "category", "batch_size", "tokens_per_verify_mean", "tokens_per_verify_std",
        "server_throughput_tok_s", "server_busy_s", "generated_tokens", "itl_ms_mean", "ttft_ms_mean",
        "cost_per_1k_tokens_usd", "proactive_hit_rate"}


def test_bench_writes_results_report_and_plots(cli_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Write a function that adds two numbers."}\n'
                       '{"turns": ["Sort a list of names.", "Now reverse it."], "category": "coding"}\n')
    out = tmp_path / "out"
    done = subprocess.run([*SPECEDGE, "bench", "--prompts", str(prompts), "--num-prompts", "1", "--max-tokens", "12",
                           "--batch-sizes", "1,2", "--out", str(out)], env=cli_env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["throughput_in_table"] == "generated tokens per server busy second"
    assert results["settings"]["strategy"] == "pipeline"  # the default
    runs = results["runs"]
    assert {(r["mode"], r["batch_size"]) for r in runs} == {(m, b) for m in ("autoregressive", "server-only",
                                                                             "specedge") for b in (1, 2)}
    for run in runs:
        assert KEYS <= set(run), KEYS - set(run)
        assert run["generated_tokens"] > 0 and run["server_busy_s"] > 0
        assert (run["proactive_hit_rate"] is None) == (run["mode"] != "specedge")
        assert 0 < run["verify_batch_mean"] <= run["batch_size"]  # trees per verification pass
        if run["mode"] == "autoregressive":
            assert run["tokens_per_verify_mean"] == 1.0
    report = (out / "report.md").read_text()
    assert "| specedge |" in report and "× server-only" in report and "trees/pass" in report
    for plot in ("cost_vs_batch.png", "itl_vs_batch.png", "timeline.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_bench_refuses_a_missing_prompts_file_clearly(cli_env, tmp_path):
    done = subprocess.run([*SPECEDGE, "bench", "--prompts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)],
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nope.jsonl" in done.stderr and "Traceback" not in done.stderr
