"""`specedge bench-verify`: the verifier engine's benchmark — the whole verify step
(forward, acceptance, commit) per attention backend, side by side, over a grid.

    specedge bench-verify [--batch 1,8,32,64] [--nodes 8,33] [--context 512,2048,4096]
                          [--backends exact,flex,reference] [--device cpu|cuda] [--target PATH|qwen3-14b]
                          [--json FILE] [--markdown FILE]
    specedge bench-verify --prefill-arrival 4096   # a long prompt riding along with 8 verifying sessions

Each row: median ms of a verify step of `batch` sessions, each with `context` committed
tokens and a tree of `nodes` nodes (root included); device→host transfers per pass
(counted with a hook around every tensor method that copies to the host); K/V bytes
copied per pass beyond the new nodes' own K/V (the runners count every copy they make);
host CPU ms per pass; KV bytes held per session against the tokens in it; on CUDA, the
ratio of the step to the floor of `HARDWARE.md` for the GPU it runs on. A batch lists its
sessions in a seeded random order (the order drafts arrive in), not in cache order, as a
verifier meets them. Cells that do not fit in memory are skipped with a note. The cells
of one grid point run back to back, so the backends are compared under the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from specedge.engine.backends import ATTENTION_BACKENDS
from specedge.engine.kv_pool import EXTENT
from specedge.engine.parties import Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.models import BUNDLED_TARGET, bundled
from specedge.protocol import DraftTreeMsg

# bandwidth (bytes/s) and dense bf16 peak (flop/s) by GPU name (HARDWARE.md)
GPUS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.04e12, 312e12), "4090": (1.01e12, 165e12)}
HOST_COPIES = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_transfers():
    """Count calls of the tensor methods that bring data to the host (a list of names)."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}

    def hooked(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)
        return method

    for name in HOST_COPIES:
        setattr(torch.Tensor, name, hooked(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def floor_ms(model, batch: int, nodes: int, context: int) -> float | None:
    """The floor of one pass on this CUDA GPU (HARDWARE.md), or None off CUDA / unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    spec = next((v for k, v in GPUS.items() if k in name), None)
    if spec is None:
        return None
    bandwidth, peak = spec
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters()) - config.vocab_size * config.hidden_size
    width = next(model.parameters()).element_size()
    kv_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * width
    tokens = batch * nodes
    moved = weights + batch * context * kv_token + tokens * kv_token
    flops = 2 * params * tokens + 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * \
        tokens * context + 2 * config.hidden_size * config.vocab_size * tokens
    return 1000 * max(moved / bandwidth, flops / peak)


def binary_tree(nodes: int) -> list[int]:
    """Parents of the drafted nodes of a binary tree of `nodes` nodes, root included (-1 = root)."""
    return [-1 if i == 1 else (i - 1) // 2 - 1 for i in range(1, nodes)]


def measure(model, backend: str, batch: int, nodes: int, context: int, repeats: int) -> dict:
    """One row: `repeats` verify steps after a warm-up step."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    verifier = Verifier(model, max_sessions=batch, max_len=context + (repeats + 2) * nodes + 2,
                        max_tree_nodes=max(nodes, 1), attention=backend)
    gen = torch.Generator().manual_seed(batch * 1000 + nodes)
    vocab = model.config.vocab_size
    for b in range(batch):
        verifier.open(f"s{b}", torch.randint(3, vocab, (context,), generator=gen).tolist(), SamplingSpec())
    parents = binary_tree(nodes)
    runner = verifier.runner
    # a batch lists its sessions in the order their drafts arrived, not in cache order
    arrival = [f"s{b}" for b in torch.randperm(batch, generator=gen).tolist()]
    steps, transfers, copied, cpu = [], [], [], []
    for step in range(repeats + 1):
        trees = [DraftTreeMsg(session_id=sid, cycle=s.cycle, committed_len=len(s.committed),
                              tokens=torch.randint(3, vocab, (len(parents),), generator=gen).tolist(), parents=parents)
                 for sid, s in ((sid, verifier.sessions[sid]) for sid in arrival)]
        copied0, cpu0 = runner.kv_bytes_copied, time.process_time()
        sync()
        started = time.perf_counter()
        with count_host_transfers() as calls:
            verifier.verify(trees)
        sync()
        if step:  # the first step warms up (and compiles)
            steps.append(1000 * (time.perf_counter() - started))
            transfers.append(len(calls))
            copied.append(runner.kv_bytes_copied - copied0)
            cpu.append(1000 * (time.process_time() - cpu0))
    kv_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * model.config.head_dim * \
        next(model.parameters()).element_size()
    if backend == "reference":
        held = runner.max_len * kv_token  # a dense slot per session
    else:
        held = statistics.mean(len(t.extents) for t in runner.pool.tables.values()) * EXTENT * kv_token
    tokens = statistics.mean(len(s.committed) for s in verifier.sessions.values())
    median = statistics.median(steps)
    floor = floor_ms(model, batch, nodes, context)
    del verifier
    return {"backend": backend, "batch": batch, "nodes": nodes, "context": context,
            "step_ms_median": round(median, 3), "host_transfers_per_pass": statistics.median(transfers),
            "kv_bytes_copied_per_pass": int(statistics.median(copied)), "host_cpu_ms_per_pass": round(
                statistics.median(cpu), 3), "kv_bytes_per_session": int(held), "tokens_per_session": round(tokens),
            "floor_ms": None if floor is None else round(floor, 3),
            "floor_ratio": None if floor is None else round(median / floor, 3)}


def measure_prefill_arrival(model, prompt_tokens: int, batch: int = 8, context: int = 300, nodes: int = 13,
                            samples: int = 16, attention: str = "exact") -> dict:
    """A prompt of `prompt_tokens` arrives while `batch` sessions verify `nodes`-node trees:
    their p99 step time before and while its chunks ride along, against the slowest of the
    same chunks prefilled alone."""
    from specedge.engine.runner import ForwardRequest  # noqa: PLC0415

    verifier = Verifier(model, max_sessions=batch + 2, max_len=prompt_tokens + 400, max_tree_nodes=nodes,
                        attention=attention)
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    for b in range(batch):
        verifier.open(f"s{b}", torch.randint(3, vocab, (context,), generator=gen).tolist(), SamplingSpec())
    parents = binary_tree(nodes)
    chunk = verifier.prefill_chunk

    def step() -> float:
        trees = [DraftTreeMsg(session_id=sid, cycle=s.cycle, committed_len=len(s.committed), parents=parents,
                              tokens=torch.randint(3, vocab, (len(parents),), generator=gen).tolist())
                 for sid, s in verifier.sessions.items() if not s.to_prefill]
        started = time.perf_counter()
        verifier.step(trees, chunk)
        return 1000 * (time.perf_counter() - started)

    def p99(values: list[float]) -> float:
        return sorted(values)[max(0, int(0.99 * len(values)) - 1)]

    verifier.begin("warm-up", torch.randint(3, vocab, (3 * chunk,), generator=gen).tolist(), SamplingSpec())
    while verifier.prefilling("warm-up"):  # compiles the kernel for passes that carry a chunk
        step()
    verifier.close("warm-up")
    before = [step() for _ in range(samples)]
    prompt = torch.randint(3, vocab, (prompt_tokens,), generator=gen).tolist()
    verifier.begin("long", prompt, SamplingSpec())
    during = []
    while verifier.prefilling("long"):
        during.append(step())
    alone = type(verifier.runner)(model, kv_tokens=prompt_tokens + 1024, max_scratch=chunk, prefill_chunk=chunk)
    alone.open("x")
    alone.forward([ForwardRequest("x", prompt[:chunk], list(range(-1, chunk - 1)))])  # warm up
    alone.rollback_scratch("x")
    chunk_ms = []
    for start in range(0, prompt_tokens - 1, chunk):
        piece = prompt[start : min(start + chunk, prompt_tokens - 1)]
        started = time.perf_counter()
        alone.forward([ForwardRequest("x", piece, list(range(-1, len(piece) - 1)))])
        chunk_ms.append(1000 * (time.perf_counter() - started))
        alone.commit("x", list(range(len(piece))))
    return {"scenario": "prefill_arrival", "batch": batch, "nodes": nodes, "context": context,
            "prompt_tokens": prompt_tokens, "passes_carrying_chunks": len(during),
            "p99_step_ms_before": round(p99(before), 3), "p99_step_ms_during": round(p99(during), 3),
            "p99_growth_ms": round(p99(during) - p99(before), 3), "chunk_alone_ms_max": round(max(chunk_ms), 3)}


def markdown(rows: list[dict], title: str) -> str:
    cols = ["backend", "batch", "nodes", "context", "step_ms_median", "floor_ratio", "host_transfers_per_pass",
            "kv_bytes_copied_per_pass", "host_cpu_ms_per_pass", "kv_bytes_per_session", "tokens_per_session"]
    lines = [title, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def load_target(target: str, device: str, dtype: str):
    from specedge.engine.loading import load_causal_lm, pick_device, pick_dtype  # noqa: PLC0415
    from specedge.engine.shapes import is_shape, random_model  # noqa: PLC0415

    if is_shape(target):
        dev = pick_device(device)
        return random_model(target, pick_dtype(dtype, dev, torch.bfloat16), dev)
    return load_causal_lm(target, device, dtype).model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specedge bench-verify", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=bundled(BUNDLED_TARGET),
                        help="a model path, or a shape with random weights: qwen3-14b, qwen3-0.6b, … or a config.json")
    parser.add_argument("--batch", default="1,8,32,64")
    parser.add_argument("--nodes", default="8,33")
    parser.add_argument("--context", default="512,2048,4096")
    parser.add_argument("--backends", default="exact,flex,reference")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", dest="json_path", help="write the rows here as a JSON list")
    parser.add_argument("--markdown", help="write the table here too")
    parser.add_argument("--prefill-arrival", type=int, metavar="TOKENS",
                        help="instead: a prompt of TOKENS arriving while 8 sessions verify (the first of --backends)")
    args = parser.parse_args(argv)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - set(ATTENTION_BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(ATTENTION_BACKENDS)}")
    model = load_target(args.target, args.device, args.dtype)
    if args.prefill_arrival:
        if backends[0] == "reference":
            parser.error("--prefill-arrival measures a paged backend: exact or flex")
        row = measure_prefill_arrival(model, args.prefill_arrival, attention=backends[0])
        sys.stdout.write(json.dumps(row) + "\n")
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(row, f, indent=1)
        return 0
    param = next(model.parameters())
    title = (f"bench-verify: {args.target} on {torch.cuda.get_device_name() if param.is_cuda else 'cpu'} "
             f"({str(param.dtype).removeprefix('torch.')}), median of {args.repeats} verify steps")
    rows = []
    for context in ints(args.context):
        for batch in ints(args.batch):
            for nodes in ints(args.nodes):
                for backend in backends:
                    try:
                        row = measure(model, backend, batch, nodes, context, args.repeats)
                    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                        if "out of memory" not in str(exc).lower() and not isinstance(
                                exc, torch.OutOfMemoryError | MemoryError):
                            raise
                        sys.stderr.write(f"skipped {backend} batch {batch} × {nodes} nodes × {context}: "
                                         "out of memory\n")
                        continue
                    finally:
                        if param.is_cuda:
                            torch.cuda.empty_cache()
                    rows.append(row)
                    sys.stderr.write(json.dumps(row) + "\n")  # progress, row by row
    write_outputs(rows, markdown(rows, title), args.json_path, args.markdown)
    return 0


def write_outputs(rows: list[dict], table: str, json_path: str | None, markdown_path: str | None) -> None:
    """A benchmark's table to stdout; its rows as JSON and the table as markdown where asked."""
    sys.stdout.write(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table)


if __name__ == "__main__":
    raise SystemExit(main())
