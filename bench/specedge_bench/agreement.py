"""How often the draft's next token is the target's, along the target's own greedy replies.

The quantity speculation lives on: every tree is the draft's guess at what the target
will say next. Per Spec-Bench category (prompts picked as `specedge bench` picks them),
the target answers each prompt greedily; the draft reads the same text, and at every reply
position its greedy next token is compared with the target's (top-1) and the target's
token looked for among the draft's four most likely (top-4). `agreement` is also how
`models/train_tiny_pair.py` measures its alignment stage.

    python -m specedge_bench.agreement --num-prompts 8 --max-tokens 64 [--draft DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from specedge.engine.loading import load_causal_lm
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled, chat_prompt_ids
from specedge_bench.serving import load_prompts

log = logging.getLogger("specedge.bench_agreement")
CATEGORIES = ("multi-turn", "translation", "summarization", "qa", "math_reasoning", "rag")


@torch.no_grad()
def greedy_replies(target, prompts: list[list[int]], max_tokens: int) -> list[tuple[int, list[int]]]:
    """(prompt length, prompt + the target's greedy reply) for each prompt."""
    return [(len(ids), target.generate(torch.tensor([ids], device=target.device), max_new_tokens=max_tokens,
                                       do_sample=False)[0].tolist()) for ids in prompts]


@torch.no_grad()
def agreement(draft, samples: list[tuple[int, list[int]]]) -> dict[str, float]:
    """Top-1 and top-4 agreement of the draft with the replies in `samples` (prompt length, sequence)."""
    top1 = top4 = total = 0
    for prompt_len, seq in samples:
        reply = torch.tensor(seq[prompt_len:], device=draft.device)
        if len(reply) == 0:
            continue
        logits = draft(input_ids=torch.tensor([seq], device=draft.device)).logits[0, prompt_len - 1 : -1]
        top1 += int((logits.argmax(-1) == reply).sum())
        top4 += int((logits.topk(4, -1).indices == reply[:, None]).any(-1).sum())
        total += len(reply)
    return {"top1": top1 / max(1, total), "top4": top4 / max(1, total), "positions": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", help="JSONL with `turns` or `prompt` per line (default: Spec-Bench)")
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--num-prompts", type=int, default=8, help="per category")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--target", default=bundled(BUNDLED_TARGET))
    parser.add_argument("--draft", default=bundled(BUNDLED_DRAFT))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    target, draft = load_causal_lm(args.target), load_causal_lm(args.draft)
    results = {}
    by_category = load_prompts(args.prompts, [c for c in args.categories.split(",") if c], args.num_prompts)
    for category, texts in by_category.items():
        prompts = [chat_prompt_ids(target.tokenizer, t) for t in texts]
        samples = greedy_replies(target.model.eval(), prompts, args.max_tokens)
        results[category] = {k: round(v, 3) for k, v in agreement(draft.model.eval(), samples).items()}
        log.info("%s: %s", category, results[category])
    lines = ["| category | top-1 | top-4 | positions |", "|---|---|---|---|"]
    lines += [f"| {c} | {r['top1']:.3f} | {r['top4']:.3f} | {r['positions']} |" for c, r in results.items()]
    sys.stdout.write("\n".join(lines) + "\n\n" + json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
