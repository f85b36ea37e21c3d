"""Real clients that serving engineers point at vLLM, run against `specedge up`.

- `lm-eval` (its `local-completions` model, tokenized requests as it sends them by default)
  on a small loglikelihood task and a small generation task, from local data files
  (`data/`; nothing is downloaded): it runs to the end, every loglikelihood equals the
  target's computed directly with `transformers` (to 1e-4 per token), each greedy flag
  agrees, and every generation is the target's own greedy output.
- NVIDIA's `aiperf`, a short streaming chat run: no request fails, and its TTFT and ITL
  agree with the gateway's own Prometheus histograms over the run within 10%.

They take minutes and tools with their own dependencies, so they are not in `make test`:
`make conformance` installs the tools into `.venv-conformance` (`tests/conformance/requirements.txt`)
and runs this file with `SPECEDGE_CONFORMANCE_TOOLS` naming their bin folder; without it,
it is skipped. `SPECEDGE_CONFORMANCE_REPORT` names a
JSON file for the numbers (docs/benchmarks.md records them).
"""

import json
import os
import pathlib
import re
import subprocess

import httpx
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge.models import BUNDLED_TARGET, bundled
from tests.helpers import specedge_up

TOOLS = pathlib.Path(os.environ.get("SPECEDGE_CONFORMANCE_TOOLS", "/nonexistent"))  # set by `make conformance`
REPORT = os.environ.get("SPECEDGE_CONFORMANCE_REPORT")
DATA = pathlib.Path(__file__).parent / "data"
MODEL = "specedge-tiny-target"
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not (TOOLS / "lm_eval").exists() or not (TOOLS / "aiperf").exists(),
    reason="the conformance clients run in `make conformance` (SPECEDGE_CONFORMANCE_TOOLS: their virtualenv's bin)")]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
GENERATION = {"until": ["\n\n"], "max_gen_toks": 24, "do_sample": False, "temperature": 0}


@pytest.fixture(scope="module")
def stack():
    with specedge_up() as s:
        yield s


@pytest.fixture(scope="module")
def target():
    return (AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET)),
            AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval())


def report(section: str, numbers: dict) -> None:
    if not REPORT:
        return
    path = pathlib.Path(REPORT)
    found = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**found, section: numbers}, indent=2) + "\n")


def tasks(folder: pathlib.Path) -> None:
    """The two lm-eval tasks, over the local data files."""
    common = {"dataset_path": "json", "test_split": "test"}
    (folder / "loglikelihood.yaml").write_text(yaml.safe_dump({
        **common, "task": "specedge_loglikelihood", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(DATA / "loglikelihood.jsonl")}},
        "doc_to_text": "{{question}}", "doc_to_choice": "choices", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}]}))
    (folder / "generation.yaml").write_text(yaml.safe_dump({
        **common, "task": "specedge_generation", "output_type": "generate_until",
        "dataset_kwargs": {"data_files": {"test": str(DATA / "generation.jsonl")}},
        "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}", "generation_kwargs": GENERATION,
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))


def reference_loglikelihood(tok, model, context: str, continuation: str) -> tuple[float, bool, int]:
    """The target's own log-likelihood of `continuation` after `context`, tokenized as lm-eval
    tokenizes the pair; whether each continuation token is the target's greedy choice."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n = len(tok(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    rows = logprobs[n - 1 : len(whole) - 1]
    cont = torch.tensor(whole[n:])
    return float(rows[torch.arange(len(cont)), cont].sum()), bool((rows.argmax(-1) == cont).all()), len(cont)


def reference_generation(tok, model, prompt: str) -> str:
    ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=GENERATION["max_gen_toks"])
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    return text.split(GENERATION["until"][0])[0]


def test_lm_eval_runs_to_the_end_and_its_loglikelihoods_are_the_targets(stack, target, tmp_path):
    tok, model = target
    (tmp_path / "tasks").mkdir()
    tasks(tmp_path / "tasks")
    args = [str(TOOLS / "lm_eval"), "--model", "local-completions", "--model_args",
            f"base_url={stack.url}/v1/completions,model={MODEL},tokenizer={bundled(BUNDLED_TARGET)},"
            "tokenizer_backend=huggingface,max_retries=1",
            "--tasks", "specedge_loglikelihood,specedge_generation", "--include_path", str(tmp_path / "tasks"),
            "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(args, env={**os.environ, **OFFLINE, "OPENAI_API_KEY": stack.key}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = {re.sub(r"samples_(.*)_\d{4}-.*", r"\1", p.stem): [json.loads(x) for x in p.read_text().splitlines()]
               for p in (tmp_path / "out").rglob("samples_*.jsonl")}
    scored, worst = 0, 0.0
    for doc in samples["specedge_loglikelihood"]:
        for i, (answer, greedy) in enumerate(r[0] for r in doc["resps"]):
            arg = doc["arguments"][f"gen_args_{i}"]
            expected, expected_greedy, n = reference_loglikelihood(tok, model, arg["arg_0"], arg["arg_1"])
            worst = max(worst, abs(float(answer) - expected) / n)
            assert abs(float(answer) - expected) < 1e-4 * n, (arg, answer, expected)
            assert (greedy == "True") == expected_greedy
            scored += 1
    generations = samples["specedge_generation"]
    for doc in generations:
        assert doc["resps"][0][0] == reference_generation(tok, model, doc["arguments"]["gen_args_0"]["arg_0"])
    assert scored == sum(len(json.loads(line)["choices"]) for line in (DATA / "loglikelihood.jsonl").open())
    assert len(generations) == sum(1 for _ in (DATA / "generation.jsonl").open())
    assert any(doc["resps"][0][0] for doc in generations)  # (not all empty: the comparison means something)
    report("lm_eval", {"loglikelihood_requests": scored, "generations": len(generations),
                       "max_abs_diff_per_token": worst})


def histogram(url: str) -> dict[str, float]:
    """The gateway's TTFT and ITL histograms' sums and counts."""
    text = httpx.get(f"{url}/metrics").text
    names = ("time_to_first_token_seconds", "inter_token_latency_seconds")
    return {f"{n}_{part}": float(re.search(rf"^specedge:{n}_{part} (\S+)$", text, re.M).group(1))
            for n in names for part in ("sum", "count")}


def test_aiperf_completes_and_its_latencies_agree_with_the_gateways(stack, tmp_path):
    requests = 16
    before = histogram(stack.url)
    args = [str(TOOLS / "aiperf"), "profile", "--model", MODEL, "--url", stack.url, "--endpoint-type", "chat",
            "--streaming", "--tokenizer", bundled(BUNDLED_TARGET), "--api-key", stack.key,
            "--request-count", str(requests), "--concurrency", "2", "--synthetic-input-tokens-mean", "64",
            "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", "48", "--output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true", "--output-artifact-dir", str(tmp_path / "aiperf"),
            "--ui-type", "none", "--no-auto-plot"]
    # (not HF_HUB_OFFLINE: with it aiperf 0.13 looks the local tokenizer folder up as a hub snapshot)
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "aiperf" / "profile_export_aiperf.json").read_text())
    after = histogram(stack.url)
    delta = {k: after[k] - before[k] for k in after}
    assert result["request_count"]["avg"] == requests and not result.get("error_summary")
    assert delta["time_to_first_token_seconds_count"] == requests
    gateway_ttft = 1000 * delta["time_to_first_token_seconds_sum"] / delta["time_to_first_token_seconds_count"]
    gateway_itl = 1000 * delta["inter_token_latency_seconds_sum"] / delta["inter_token_latency_seconds_count"]
    client_ttft, client_itl = result["time_to_first_token"]["avg"], result["inter_token_latency"]["avg"]
    report("aiperf", {"requests": requests, "ttft_ms": {"aiperf": client_ttft, "gateway": gateway_ttft},
                      "itl_ms": {"aiperf": client_itl, "gateway": gateway_itl}})
    assert abs(client_ttft - gateway_ttft) <= 0.1 * gateway_ttft, (client_ttft, gateway_ttft)
    assert abs(client_itl - gateway_itl) <= 0.1 * gateway_itl, (client_itl, gateway_itl)
