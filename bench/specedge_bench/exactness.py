"""How exact the engine is: its output against its own autoregressive mode and against
Hugging Face `generate`, per dtype and attention backend.

On Spec-Bench prompts (first turn, chat template), greedy: for each dtype (float32,
bfloat16) and backend (`exact`, `flex`), the engine decodes each prompt autoregressively
(one token per pass) and speculatively (`specedge` mode: a draft tree per cycle, verified in
one pass), and `transformers`' `generate(do_sample=False)` decodes it with the model's own
modules. Reported per (dtype, backend): how many prompts' `specedge` output equals the
engine's `autoregressive` output (the exactness the README promises for `exact`), how many
equal `generate`'s, and, where an output leaves `generate`'s, the position and the gap
between `generate`'s two best logits there — a near-tie that a different order of
floating-point sums decided the other way.

    python -m specedge_bench.exactness --num-prompts 20 --max-tokens 64 [--json F] [--markdown F]
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from specedge.engine.generate import generate
from specedge.engine.loading import load_causal_lm
from specedge.engine.parties import Drafter, Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import TreeParams
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled, chat_prompt_ids
from specedge_bench.verify import write_outputs

log = logging.getLogger("specedge.bench_exactness")


def spread_prompts(path: str | None, n: int) -> list[str]:
    """`n` first turns spread evenly over the prompts file (every category), as the
    equivalence tests pick them."""
    from importlib import resources  # noqa: PLC0415

    source = open(path) if path else resources.files("specedge").joinpath("data/specbench_prompts.jsonl").open()
    with source:
        rows = [json.loads(line) for line in source if line.strip()]
    step = max(1, len(rows) // n)
    return [rows[i * step]["turns"][0] for i in range(min(n, len(rows)))]


@torch.no_grad()
def near_tie(model, ids: list[int], output: list[int], position: int) -> float:
    """The gap between the two best logits `generate`'s model gives at `position` of its output."""
    context = torch.tensor([ids + output[:position]], device=model.device)
    top = model(context).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def measure(dtype: str, backend: str, prompts: list[str], max_tokens: int, device: str) -> dict:
    target = load_causal_lm(bundled(BUNDLED_TARGET), device, dtype)
    draft = load_causal_lm(bundled(BUNDLED_DRAFT), device, dtype)
    eos = set(target.model.generation_config.eos_token_id)
    verifier = Verifier(target.model, max_sessions=1, max_len=4096, attention=backend)
    drafter = Drafter(draft.model, TreeParams(budget=32, depth=4, branch=16, beams=32), attention=backend)
    row = {"dtype": dtype, "backend": backend, "prompts": len(prompts), "specedge_equals_autoregressive": 0,
           "autoregressive_equals_generate": 0, "specedge_equals_generate": 0, "divergences": []}
    for i, text in enumerate(prompts):
        ids = chat_prompt_ids(target.tokenizer, text)
        reference = target.model.generate(torch.tensor([ids], device=target.device), do_sample=False,
                                          max_new_tokens=max_tokens)[0, len(ids):].tolist()
        ar = generate("autoregressive", verifier, None, ids, SamplingSpec(), max_tokens, eos).token_ids
        spec = generate("specedge", verifier, drafter, ids, SamplingSpec(), max_tokens, eos).token_ids
        reference = reference[: len(ar)] if len(reference) > len(ar) and ar and ar[-1] in eos else reference
        row["specedge_equals_autoregressive"] += spec == ar
        row["autoregressive_equals_generate"] += ar == reference
        row["specedge_equals_generate"] += spec == reference
        if ar != reference:
            at = next((j for j, (a, b) in enumerate(zip(ar, reference, strict=False)) if a != b),
                      min(len(ar), len(reference)))
            row["divergences"].append({"prompt": i, "position": at,
                                       "top2_logit_gap": round(near_tie(target.model, ids, reference, at), 5)})
        log.info("%s %s prompt %d/%d", dtype, backend, i + 1, len(prompts))
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| dtype | backend | specedge = autoregressive | autoregressive = generate | specedge = generate | "
             "where autoregressive leaves generate: position (top-2 logit gap) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        where = ", ".join(f"{d['position']} ({d['top2_logit_gap']})" for d in r["divergences"]) or "—"
        n = r["prompts"]
        lines.append(f"| {r['dtype']} | {r['backend']} | {r['specedge_equals_autoregressive']}/{n} | "
                     f"{r['autoregressive_equals_generate']}/{n} | {r['specedge_equals_generate']}/{n} | {where} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specedge_bench.exactness",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", default=None, help="JSONL prompts (default: the bundled Spec-Bench copy)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--backends", default="exact,flex")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    parser.add_argument("--markdown", default=None, help="write the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prompts = spread_prompts(args.prompts, args.num_prompts)
    rows = [measure(dtype, backend, prompts, args.max_tokens, args.device)
            for dtype in args.dtypes.split(",") for backend in args.backends.split(",")]
    write_outputs(rows, markdown(rows), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
