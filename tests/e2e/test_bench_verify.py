"""`specedge bench-verify` and `specedge verifier --plan` through the real CLI."""

import json
import subprocess
import sys

SPECEDGE = [sys.executable, "-m", "specedge.cli"]


def test_bench_verify_rows_compare_the_backends(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([*SPECEDGE, "bench-verify", "--batch", "3", "--nodes", "8", "--context", "100",
                           "--repeats", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["exact", "flex", "reference"]
    for row in rows:
        assert {"backend", "batch", "nodes", "context", "step_ms_median", "host_transfers_per_pass",
                "kv_bytes_copied_per_pass", "kv_bytes_per_session"} <= row.keys()
        assert (row["batch"], row["nodes"], row["context"]) == (3, 8, 100)
        assert row["host_transfers_per_pass"] == 1 and row["step_ms_median"] > 0
    exact, flex, reference = rows
    assert reference["kv_bytes_copied_per_pass"] > 0  # commits move the accepted path
    assert flex["kv_bytes_copied_per_pass"] == exact["kv_bytes_copied_per_pass"] == 0
    assert flex["kv_bytes_per_session"] < reference["kv_bytes_per_session"]  # pages held, not a max_len slot
    assert exact["kv_bytes_per_session"] == flex["kv_bytes_per_session"]  # the same paged pool
    assert "| flex | 3 | 8 | 100 |" in done.stdout and "| exact | 3 | 8 | 100 |" in done.stdout


def test_verifier_plan_prints_one_json_line_for_a_qwen3_14b_shape():
    done = subprocess.run([*SPECEDGE, "verifier", "--target", "qwen3-14b", "--memory-gib", "80", "--plan"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert plan["kv_bytes_per_token"] == 2 * 40 * 8 * 128 * 2
    assert 29e9 < plan["weights_bytes"] < 30e9
    assert plan["sessions_at"]["4096"] >= 64
    assert plan["weights_bytes"] + plan["activation_reserve_bytes"] + plan["kv_bytes"] <= 0.9 * 80 * 2**30
