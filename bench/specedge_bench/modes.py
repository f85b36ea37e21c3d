"""Benchmark the three modes in one process, side by side, on the same prompts.

    python -m specedge_bench.modes [--categories coding] [--num-prompts 10] [--max-tokens 64]
                                          [--budget 32] [--depth 4] [--rtt-ms 0]

Prints a Markdown table: per mode, mean (± std) tokens per verification, target forward
passes per generated token, proactive hit rate, wall time per token and server busy time
per token (verification, plus drafting where the draft runs on the server: server-only);
and checks on the way that every mode produced the same tokens. Results belong in docs/benchmarks.md.
This is the in-process benchmark of the speculative core; the service-level benchmark
(`specedge bench`) is separate.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from importlib import resources

from specedge.engine.generate import MODES, generate
from specedge.engine.loading import load_causal_lm
from specedge.engine.parties import Drafter, Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import TreeParams
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled, chat_prompt_ids
from specedge.protocol import tree_temperature

log = logging.getLogger("specedge.bench_modes")


def load_prompts(path: str | None, categories: list[str] | None, n: int) -> list[str]:
    source = open(path) if path else resources.files("specedge").joinpath("data/specbench_prompts.jsonl").open()
    with source:
        text = source.read()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = [r for r in rows if not categories or r.get("category") in categories]
    rows = rows[:: max(1, len(rows) // n)][:n]  # spread evenly over the file (and its categories)
    return [r["turns"][0] if "turns" in r else r["prompt"] for r in rows]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", help="JSONL with `turns` or `prompt` per line (default: Spec-Bench)")
    parser.add_argument("--categories", default="coding", help="comma-separated; empty for all")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--branch", type=int, default=16)
    parser.add_argument("--beams", type=int, default=32)
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--target", default=bundled(BUNDLED_TARGET))
    parser.add_argument("--draft", default=bundled(BUNDLED_DRAFT))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    categories = [c for c in args.categories.split(",") if c]
    texts = load_prompts(args.prompts, categories, args.num_prompts)
    target, draft = load_causal_lm(args.target), load_causal_lm(args.draft)
    tok = target.tokenizer
    prompts = [chat_prompt_ids(tok, t) for t in texts]
    longest = max(len(p) for p in prompts) + args.max_tokens + args.depth + 2
    verifier = Verifier(target.model, max_sessions=1, max_len=longest, max_tree_nodes=max(args.budget, 1))
    drafter = Drafter(draft.model, TreeParams(args.budget, args.depth, args.branch, args.beams,
                                              tree_temperature(0.0)),  # greedy
                      max_sessions=1, max_len=longest)
    eos = set(target.model.generation_config.eos_token_id)
    rows: dict[str, dict[str, list[float]]] = {m: {"tpv": [], "passes": [], "hit": [], "ms": [], "server_ms": []}
                                         for m in MODES}
    outputs: dict[str, list[list[int]]] = {m: [] for m in MODES}
    started = time.perf_counter()
    for i, ids in enumerate(prompts):
        for mode in MODES:  # interleaved, so machine noise hits every mode alike
            out = generate(mode, verifier, drafter, ids, SamplingSpec(), args.max_tokens, eos,
                           one_way_delay_s=args.rtt_ms / 2000)
            n = max(1, len(out.token_ids))
            rows[mode]["tpv"].append(out.mean_tokens_per_verify)
            rows[mode]["passes"].append(out.target_forward_passes / n)
            rows[mode]["ms"].append(1000 * out.elapsed_s / n)
            rows[mode]["server_ms"].append(1000 * out.server_busy_s / n)
            if out.proactive_hit_rate is not None:
                rows[mode]["hit"].append(out.proactive_hit_rate)
            outputs[mode].append(out.token_ids)
        log.info("prompt %d/%d done (%.0fs)", i + 1, len(prompts), time.perf_counter() - started)
    identical = outputs["autoregressive"] == outputs["server-only"] == outputs["specedge"]
    base_ms = statistics.fmean(rows["autoregressive"]["ms"])
    base_server = statistics.fmean(rows["autoregressive"]["server_ms"])
    lines = [
        f"{len(prompts)} prompts ({args.categories or 'all categories'}), {args.max_tokens} new tokens, greedy; "
        f"tree budget {args.budget}, depth {args.depth}, branch {args.branch}, beams {args.beams}; "
        f"simulated RTT {args.rtt_ms} ms; outputs identical across modes: {identical}",
        "",
        "| mode | tokens per verify | target passes per token | proactive hit rate | wall ms per token "
        "| wall speed vs AR | server busy ms per token | server throughput vs AR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = rows[mode]
        lines.append(f"| {mode} | {mean_std(r['tpv'])} | {mean_std(r['passes'])} | {mean_std(r['hit'])} "
                     f"| {mean_std(r['ms'])} | {base_ms / statistics.fmean(r['ms']):.2f}× "
                     f"| {mean_std(r['server_ms'])} | {base_server / statistics.fmean(r['server_ms']):.2f}× |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
