"""Tokens per verification as a function of the draft tree's shape (budget × depth).

The simulator's acceptance model (`specedge_bench.simulator`) needs to know how
acceptance changes when the scheduler shrinks or deepens trees; this measures it for a
target/draft pair on Spec-Bench prompts (greedy, server-only mode: acceptance does not
depend on where the draft runs).

    python -m specedge_bench.acceptance --num-prompts 8 --budgets 4,8,16,32,64 --depths 2,3,4,6 \
        --temperatures 1,0.5

`--temperatures`: the trees' scoring temperatures (`TreeParams.temperature`; the system
scores greedy trees at `protocol.tree_temperature(0)`), one table each.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys

from specedge.engine.generate import generate
from specedge.engine.loading import load_causal_lm
from specedge.engine.parties import Drafter, Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import TreeParams
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled, chat_prompt_ids
from specedge.protocol import tree_temperature
from specedge_bench.modes import load_prompts

log = logging.getLogger("specedge.bench_acceptance")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", help="JSONL with `turns` or `prompt` per line (default: Spec-Bench)")
    parser.add_argument("--categories", default="", help="comma-separated; empty for all")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--budgets", default="4,8,16,32,64")
    parser.add_argument("--depths", default="2,3,4,6")
    parser.add_argument("--temperatures", default=str(tree_temperature(0.0)),
                        help="comma-separated tree scoring temperatures (default: the greedy one)")
    parser.add_argument("--target", default=bundled(BUNDLED_TARGET))
    parser.add_argument("--draft", default=bundled(BUNDLED_DRAFT))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    texts = load_prompts(args.prompts, [c for c in args.categories.split(",") if c], args.num_prompts)
    target, draft = load_causal_lm(args.target), load_causal_lm(args.draft)
    tok = target.tokenizer
    prompts = [chat_prompt_ids(tok, t) for t in texts]
    budgets, depths = [int(b) for b in args.budgets.split(",")], [int(d) for d in args.depths.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    longest = max(len(p) for p in prompts) + args.max_tokens + max(depths) + 2
    verifier = Verifier(target.model, max_sessions=1, max_len=longest, max_tree_nodes=max(budgets))
    eos = set(target.model.generation_config.eos_token_id)
    out = f"{len(prompts)} prompts, {args.max_tokens} new tokens, greedy; tokens per verify\n"
    for temperature in temperatures:
        grid = {}
        for depth in depths:
            for budget in budgets:
                drafter = Drafter(draft.model, TreeParams(budget, depth, 16, 32, temperature), max_sessions=1,
                                  max_len=longest)
                tpv = [generate("server-only", verifier, drafter, ids, SamplingSpec(), args.max_tokens, eos)
                       .mean_tokens_per_verify for ids in prompts]
                grid[f"{budget}x{depth}"] = round(statistics.fmean(tpv), 3)
                log.info("temperature %g budget %d depth %d: %.2f tokens per verify", temperature, budget, depth,
                         grid[f"{budget}x{depth}"])
        lines = ["| depth \\ budget | " + " | ".join(map(str, budgets)) + " |", "|---" * (len(budgets) + 1) + "|"]
        lines += [f"| {d} | " + " | ".join(f"{grid[f'{b}x{d}']:.2f}" for b in budgets) + " |" for d in depths]
        out += f"\ntree temperature {temperature:g}\n\n" + "\n".join(lines) + "\n\n" + json.dumps(grid) + "\n"
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
