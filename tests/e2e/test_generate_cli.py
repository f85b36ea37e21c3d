"""`specedge generate` through the real CLI: three modes, one output, honest statistics."""

import json
import subprocess

import pytest

from tests.conftest import SPECEDGE

pytestmark = pytest.mark.e2e
PROMPT = "Return the sum of a list of numbers."


def run(*args: str, env) -> subprocess.CompletedProcess:
    return subprocess.run([*SPECEDGE, "generate", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3",
                                            "--dtype", "bfloat16"]])
def test_three_modes_give_the_same_tokens(sampling, cli_env):
    results = {}
    for mode in ("autoregressive", "server-only", "specedge"):
        done = run("--mode", mode, "--chat", "--prompt", PROMPT, "--max-tokens", "48", "--json", "--rtt-ms", "4",
                   *sampling, env=cli_env)
        assert done.returncode == 0, done.stderr
        results[mode] = json.loads(done.stdout)
    ids = {mode: r["token_ids"] for mode, r in results.items()}
    assert ids["autoregressive"] == ids["server-only"] == ids["specedge"]
    assert {r["engine"] for r in results.values()} == {"exact-bfloat16" if "--dtype" in sampling else "exact-float32"}
    assert results["autoregressive"]["tokens_per_verify"] == 1.0
    for mode in ("server-only", "specedge"):
        r = results[mode]
        assert r["num_verifies"] == r["target_forward_passes"] < len(r["token_ids"])
        assert r["tokens_per_verify"] == pytest.approx(len(r["token_ids"]) / r["num_verifies"], abs=0.5)
    assert 0 <= results["specedge"]["proactive_hit_rate"] <= 1
    assert results["autoregressive"]["proactive_hit_rate"] is None
    assert set(results["specedge"]) >= {"text", "token_ids", "tokens_per_verify", "num_verifies",
                                        "proactive_hit_rate", "elapsed_s"}


def test_plain_output_is_the_text_and_bad_input_is_a_clear_error(cli_env):
    done = run("--prompt", "def add(a, b):", "--max-tokens", "8", env=cli_env)
    assert done.returncode == 0 and done.stdout.strip()
    bad = run("--prompt", "x", "--mode", "telepathy", env=cli_env)
    assert bad.returncode == 2 and "mode" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("--prompt", "x", "--target", "/no/such/model", env=cli_env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
