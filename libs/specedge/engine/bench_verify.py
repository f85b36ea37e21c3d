"""Measure verification cost: one target forward over a batch of trees, by batch size and tree size.

    python -m specedge.engine.bench_verify [--batch-sizes 1,2,4,8] [--nodes 1,16,32,64]
                                           [--context 256] [--device auto] [--json FILE]

Each cell is the median over `--repeats` forward passes of `ModelRunner.forward` with
`batch` sessions, each holding `context` committed tokens and verifying a tree of `nodes`
nodes (root included). This is the verifier's cost model — what a pipeline-aware
scheduler must predict — and the check to run on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from specedge.engine.loading import load_causal_lm
from specedge.engine.runner import ForwardRequest, ModelRunner
from specedge.models import BUNDLED_TARGET, bundled, model_id


def measure(runner: ModelRunner, batch: int, nodes: int, repeats: int) -> float:
    """Median milliseconds of one batched tree forward (sessions already prefilled)."""
    parents = [-1] + [(i - 1) // 2 for i in range(1, nodes)]  # a binary tree, parents first
    requests = [ForwardRequest(f"s{b}", [7 + b] * nodes, parents) for b in range(batch)]
    times = []
    for _ in range(repeats + 1):
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        runner.forward(requests)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        for b in range(batch):
            runner.rollback_scratch(f"s{b}")
    return 1000 * statistics.median(times[1:])  # the first pass warms up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=bundled(BUNDLED_TARGET))
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--nodes", default="1,16,32,64")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", dest="json_path", help="also write the grid as JSON here")
    args = parser.parse_args(argv)

    batches = [int(x) for x in args.batch_sizes.split(",")]
    node_counts = [int(x) for x in args.nodes.split(",")]
    target = load_causal_lm(args.target, args.device, args.dtype)
    runner = ModelRunner(target.model, max_sessions=max(batches), max_len=args.context + max(node_counts) + 1,
                         max_scratch=max(*node_counts, 256) + 1)
    for b in range(max(batches)):
        runner.open(f"s{b}")
        runner.prefill(f"s{b}", [(11 * b + i) % 4000 + 3 for i in range(args.context)])
    grid = {(b, n): measure(runner, b, n, args.repeats) for b in batches for n in node_counts}

    header = f"target {model_id(target.source)} on {target.device} ({str(target.dtype).removeprefix('torch.')}), " \
             f"context {args.context}; median ms per verification pass"
    lines = [header, "", "| batch \\ nodes | " + " | ".join(map(str, node_counts)) + " |",
             "|---|" + "---|" * len(node_counts)]
    for b in batches:
        lines.append(f"| {b} | " + " | ".join(f"{grid[(b, n)]:.2f}" for n in node_counts) + " |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"device": str(target.device), "dtype": str(target.dtype), "context": args.context,
                       "ms": [{"batch": b, "nodes": n, "ms": grid[(b, n)]} for b, n in grid]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
