"""Batch-invariant kernels: a row's result never depends on the other rows of its pass.

The exact engine (`exact_runner.ExactRunner`) computes every token's logits so that they
are bit for bit those of the same token decoded alone, one per pass — whatever else is in
the batch, however wide its tree, however its cache was prefilled. Floating-point sums
give that only when every value is reduced in the same order whatever the pass's shape,
so each piece of the forward keeps to one rule:

- **Matrix products** (`linear`, attention's two products): rows are padded to a multiple
  of `ROW_TILE` and every other dimension is at least `ROW_TILE`. A BLAS picks its kernel
  (and so its summation order) by shape, and treats small row counts specially; padded,
  every product a row takes part in runs the same kernel with the same split of the
  reduction. `tests/integration/test_exact_runner.py` checks the result bit for bit.
- **Per-row reductions** (RMS norms, the softmax sums) run over the row's last dimension,
  which PyTorch never splits across threads; their lengths are fixed by the model or by
  the attention block.
- **Elementwise functions** use only operations whose every lane gives the scalar result:
  `silu` is written `x / (1 + exp(-x))` (PyTorch's fused `silu` and `sigmoid` differ in
  the last bit between their vector body and their scalar tail, so a value's result
  would depend on where it sits in the tensor); rotary embeddings come from a table
  (`RotaryTable`) built once, in chunks of one fixed size.
- **Attention** (`attend_in_order`) reduces every query over its keys in position order,
  in blocks of `BLOCK` positions with the blocks added one after another — the order of
  a single-token pass over a cache laid out in order, whichever slots the keys occupy.

Pure functions over tensors; the runner owns the cache and the plan of a pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specedge.engine.kv_pool import EXTENT

ROW_TILE = 16  # rows of every matrix product are padded to a multiple of this
BLOCK = EXTENT  # attention adds up keys in blocks of this many positions
ROTARY_CHUNK = 1024  # the rotary table is built this many positions at a time


def _pad_rows(x: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """`x` with zero rows appended along `dim` up to a multiple of ROW_TILE."""
    pad = -x.shape[dim] % ROW_TILE
    if not pad:
        return x.contiguous()  # the same memory layout, padded or not
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` whose every output row is independent of how many rows `x` has."""
    rows = x.reshape(-1, x.shape[-1])
    out = F.linear(_pad_rows(rows, 0), weight, bias)[: rows.shape[0]]
    return out.reshape(*x.shape[:-1], weight.shape[0])


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` (batched) with `a`'s rows padded; `b`'s columns must be at least ROW_TILE."""
    return (_pad_rows(a) @ b)[..., : a.shape[-2], :]


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU from operations whose vector and scalar paths agree bit for bit."""
    return x / (1 + torch.exp(-x))


def mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated SiLU MLP (Qwen, Llama): down(silu(gate(x)) * up(x))."""
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    return linear(silu(linear(x, gate.weight, gate.bias)) * linear(x, up.weight, up.bias), down.weight, down.bias)


class RotaryTable:
    """cos/sin of every position, from the model's own rotary module, computed once in
    chunks of ROTARY_CHUNK positions (so a position's values never depend on the pass)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rotary = model.model.rotary_emb
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cos = torch.empty(0, device=self.device, dtype=self.dtype)
        self.sin = self.cos

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's rows for `positions` (all below what `reserve` was given)."""
        return self.cos[positions], self.sin[positions]

    def reserve(self, n_positions: int) -> None:
        """Extend the table to hold positions below `n_positions` (known on the host: no sync)."""
        while self.cos.shape[0] < n_positions:
            start = self.cos.shape[0]
            chunk = torch.arange(start, start + ROTARY_CHUNK, device=self.device)[None]
            cos, sin = self.rotary(torch.empty(1, ROTARY_CHUNK, 1, device=self.device, dtype=self.dtype), chunk)
            self.cos = torch.cat([self.cos.reshape(-1, cos.shape[-1]), cos[0]])
            self.sin = torch.cat([self.sin.reshape(-1, sin.shape[-1]), sin[0]])


@dataclass
class Kernels:
    """The pieces of the decoder forward a runner may replace (`runner.decoder_forward`)."""

    linear: object  # (x, weight, bias) -> x @ weight.T + bias
    mlp: object  # (mlp module, x) -> output
    rotary: object  # (hidden, positions) -> (cos, sin)
    reserve: object = lambda n_positions: None  # called before a pass with its highest position + 1


    @staticmethod
    def standard(model: torch.nn.Module) -> Kernels:
        """The model's own modules (fast, shape-dependent rounding)."""
        return Kernels(linear=F.linear, mlp=lambda module, x: module(x),
                       rotary=lambda hidden, positions: model.model.rotary_emb(hidden, positions))

    @staticmethod
    def invariant(model: torch.nn.Module) -> Kernels:
        """Batch-invariant: every row's result independent of the pass it is in."""
        act = getattr(model.config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"the exact engine supports SiLU MLPs, not {act!r}")
        table = RotaryTable(model)
        return Kernels(linear=linear, mlp=mlp, rotary=lambda hidden, positions: table(positions),
                       reserve=table.reserve)


@dataclass
class KeyRuns:
    """Runs of keys in position order, each read by a few queries, each query from the run's
    first position up to its own length (device tensors). U runs of up to R queries."""

    query: torch.Tensor  # [U, R] packed index of each run's queries (0 for padding)
    slots: torch.Tensor  # [U, L] slot of each position (0 for padding); L a multiple of BLOCK
    valid: torch.Tensor  # [U, R, L] bool: the query reads that position
    member: torch.Tensor  # [M] which of the plan's queries this part covers (each once; all of them: in order)
    run: torch.Tensor  # [M] the run it reads
    row: torch.Tensor  # [M] its row in the run


@dataclass
class QueryPlan:
    """Where a pass's queries find their keys: `parts` in position order, each a set of
    `KeyRuns`. The first part starts at position 0 for every query: per session, its
    committed tokens and, for a chain of queries (a prompt chunk, one token), the chain
    itself; for a branching tree, only the committed tokens of the full blocks. The second
    part (trees only) continues from there: the rest of the committed tokens, then the
    tree's path — one run per root-to-leaf path of the new nodes, shared by the queries on it."""

    query: torch.Tensor  # [Q] packed index of each query
    parts: list[KeyRuns]


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _key_runs(runs: list[tuple[list[int], list[int], list[int]]], device) -> KeyRuns | None:
    """`runs`: (slots, members — indices into the plan's queries —, each member's length)."""
    width = _round_up(max((len(slots) for slots, _, _ in runs), default=0))
    if not width:
        return None
    rows = max(len(members) for _, members, _ in runs)
    query = [members + [0] * (rows - len(members)) for _, members, _ in runs]  # plan_queries maps them to packed
    lengths = [lens + [0] * (rows - len(lens)) for _, _, lens in runs]
    member = [m for _, members, _ in runs for m in members]
    run = [u for u, (_, members, _) in enumerate(runs) for _ in members]
    row = [r for _, members, _ in runs for r in range(len(members))]

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    valid = torch.arange(width)[None, None, :] < torch.tensor(lengths)[:, :, None]
    return KeyRuns(query=tensor(query), slots=tensor([x + [0] * (width - len(x)) for x, _, _ in runs]),
                   valid=valid.to(device), member=tensor(member), run=tensor(run), row=tensor(row))


def plan_queries(sessions: list[tuple[list[int], list[int], list[list[int]]]], device: torch.device) -> QueryPlan:
    """`sessions`: per session, its committed slots (position order), the packed indices of
    its queries (in the tree's pre-order) and, per query, the slots of its ancestors from the
    tree's root down to itself. Returns the `QueryPlan`."""
    queries = [index for _, indices, _ in sessions for index in indices]
    shared, tails = [], []
    first = 0
    for committed, indices, chains in sessions:
        members = list(range(first, first + len(indices)))
        first += len(indices)
        longest = max(chains, key=len)
        if all(chain == longest[: len(chain)] for chain in chains):  # one path: all in the first part
            shared.append((committed + longest, members, [len(committed) + len(chain) for chain in chains]))
            continue
        full = len(committed) // BLOCK * BLOCK
        shared.append((committed[:full], members, [full] * len(members)))
        rest = committed[full:]
        for member, chain in zip(members, chains, strict=True):  # pre-order: a path goes on while a child follows
            if tails and tails[-1][3] == chain[:-1]:
                slots, run_members, lengths, _ = tails.pop()
                tails.append((rest + chain, run_members + [member], lengths + [len(rest) + len(chain)], chain))
            else:
                tails.append((rest + chain, [member], [len(rest) + len(chain)], chain))
    parts = [_key_runs(shared, device), _key_runs([t[:3] for t in tails], device)]
    plan = QueryPlan(query=torch.tensor(queries, dtype=torch.long, device=device),
                     parts=[part for part in parts if part is not None])
    for part in plan.parts:  # runs list their queries' packed indices
        part.query = plan.query[part.query]
    return plan


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., n * BLOCK] -> [..., n, BLOCK]"""
    return x.unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))


def attend_in_order(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: QueryPlan,
                    scale: float) -> torch.Tensor:
    """Attention of the plan's queries, each over its keys in position order.

    `q`: [heads, total, head_dim] (the pass's packed queries, rotated); `k_pool`, `v_pool`:
    [kv_heads, slots, head_dim]. Returns [heads, Q, head_dim] for `plan.query`, in float32.
    Scores are q·k products (`matmul`, one per run for all its queries, scaled after); the
    softmax subtracts the query's maximum score; each BLOCK of positions gives a partial
    sum of weights and of weighted values (`matmul` over exactly BLOCK keys), and the
    partial sums are added block after block in position order. Positions a query does not
    read weigh exactly 0, so neither padding nor blocks it does not reach change any bit of
    its result."""
    heads, _, head_dim = q.shape
    kv_heads = k_pool.shape[0]
    group = heads // kv_heads
    n_queries = plan.query.shape[0]
    q = q.float()
    top = torch.full((n_queries, kv_heads, group), float("-inf"), device=q.device)
    scores = []
    for part in plan.parts:  # rows of a run's product: (head in group, query)
        runs, width_rows = part.query.shape
        rows = q[:, part.query].view(kv_heads, group, runs, width_rows, head_dim)
        rows = rows.permute(0, 2, 1, 3, 4).reshape(kv_heads, runs, group * width_rows, head_dim)
        keys = k_pool[:, part.slots].float()  # [kv, U, L, head_dim]
        s = (matmul(rows, keys.transpose(-1, -2)) * scale).view(kv_heads, runs, group, width_rows, -1)
        s = s.masked_fill(~part.valid[None, :, None], float("-inf"))
        top[part.member] = torch.maximum(top[part.member], s.amax(-1)[:, part.run, :, part.row])
        scores.append(s)

    total_w = total_v = None
    for part, s in zip(plan.parts, scores, strict=True):
        runs, width_rows = part.query.shape
        top_rows = torch.full((kv_heads, runs, group, width_rows), float("inf"), device=q.device)  # padding: 0
        top_rows[:, part.run, :, part.row] = top[part.member]
        w = torch.exp(s - top_rows[..., None])  # [kv, U, group, R, L]
        values = v_pool[:, part.slots].float()
        # one product per (run, block): [group*R, BLOCK] @ [BLOCK, head_dim]
        a = _blocks(w.reshape(kv_heads, runs, group * width_rows, -1)).permute(0, 1, 3, 2, 4)
        pv = matmul(a, values.unflatten(2, (-1, BLOCK))).view(kv_heads, runs, -1, group, width_rows, head_dim)
        block_w = _blocks(w).sum(-1)[:, part.run, :, part.row]  # [M, kv, group, NB]
        block_v = pv[:, part.run, :, :, part.row].permute(0, 1, 3, 2, 4)  # [M, kv, group, NB, head_dim]
        if part.member.shape[0] != n_queries:  # queries this part does not cover add exact zeros
            block_w = block_w.new_zeros(n_queries, *block_w.shape[1:]).index_copy_(0, part.member, block_w)
            block_v = block_v.new_zeros(n_queries, *block_v.shape[1:]).index_copy_(0, part.member, block_v)
        for block in range(block_w.shape[-1]):  # one block after another, in position order
            if total_w is None:
                total_w, total_v = block_w[..., block], block_v[..., block, :]
            else:
                total_w = total_w + block_w[..., block]
                total_v = total_v + block_v[..., block, :]
    out = total_v / total_w[..., None]  # [Q, kv, group, head_dim]
    return out.reshape(n_queries, heads, head_dim).transpose(0, 1)
