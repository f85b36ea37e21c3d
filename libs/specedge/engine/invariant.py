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
class QueryPlan:
    """Where a group of queries' keys are, in position order (device tensors).

    The group has S sessions with up to R queries each. A session's *shared* positions are
    read by all its queries, each up to its own length: for a chain (a prompt chunk, one
    token) the committed tokens and the chain; for a branching tree the committed tokens
    of the full blocks. What a tree's query reads past those — the last partial block of
    committed tokens, then its ancestors and itself — is that query's *tail*.
    """

    query: torch.Tensor  # [Q] packed index of each query (queries grouped by session)
    session: torch.Tensor  # [Q] the query's session row
    row: torch.Tensor  # [Q] the query's row within its session
    session_query: torch.Tensor  # [S, R] packed index (0 for padding)
    shared_slots: torch.Tensor  # [S, NS * BLOCK] slot of each shared position (0 for padding)
    shared_valid: torch.Tensor  # [S, R, NS * BLOCK] bool: the query reads that position
    tail_slots: torch.Tensor  # [Q, NT * BLOCK] slot of each tail position (0 for padding); NT may be 0
    tail_valid: torch.Tensor  # [Q, NT * BLOCK] bool


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def plan_queries(sessions: list[tuple[list[int], list[int], list[list[int]]]], device: torch.device) -> QueryPlan:
    """`sessions`: per session, its committed slots (position order), the packed indices of
    its queries and, per query, the slots of its ancestors from the tree's root down to
    itself. Returns the group's `QueryPlan`."""
    shared, visible, tails = [], [], []
    for committed, _, chains in sessions:
        longest = max(chains, key=len)
        if all(chain == longest[: len(chain)] for chain in chains):  # one path: everything is shared
            shared.append(committed + longest)
            visible.append([len(committed) + len(chain) for chain in chains])
            tails += [[] for _ in chains]
        else:
            full = len(committed) // BLOCK * BLOCK
            shared.append(committed[:full])
            visible.append([full] * len(chains))
            tails += [committed[full:] + chain for chain in chains]
    width_shared = _round_up(max(map(len, shared)))
    width_tail = _round_up(max(map(len, tails)))
    width_rows = max(len(queries) for _, queries, _ in sessions)
    query, session, row, session_query, lengths = [], [], [], [], []
    for s, (_, queries, _) in enumerate(sessions):
        query += queries
        session += [s] * len(queries)
        row += range(len(queries))
        session_query.append(queries + [0] * (width_rows - len(queries)))
        lengths.append(visible[s] + [0] * (width_rows - len(queries)))

    def tensor(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    shared_valid = torch.arange(width_shared)[None, None, :] < torch.tensor(lengths)[:, :, None]
    tail_valid = torch.arange(width_tail)[None, :] < torch.tensor([len(t) for t in tails])[:, None]
    return QueryPlan(query=tensor(query), session=tensor(session), row=tensor(row),
                     session_query=tensor(session_query),
                     shared_slots=tensor([x + [0] * (width_shared - len(x)) for x in shared]).view(len(shared), -1),
                     shared_valid=shared_valid.to(device),
                     tail_slots=tensor([t + [0] * (width_tail - len(t)) for t in tails]).view(len(tails), -1),
                     tail_valid=tail_valid.to(device))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., n * BLOCK] -> [..., n, BLOCK]"""
    return x.unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))


def attend_in_order(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: QueryPlan,
                    scale: float) -> torch.Tensor:
    """Attention of the plan's queries, each over its keys in position order.

    `q`: [heads, total, head_dim] (the pass's packed queries, rotated); `k_pool`, `v_pool`:
    [kv_heads, slots, head_dim]. Returns [heads, Q, head_dim] for `plan.query`, in float32.
    Scores are q·k products (`matmul`, scaled after); the softmax subtracts the query's
    maximum score; each BLOCK of positions gives a partial sum of weights and of weighted
    values (`matmul` over exactly BLOCK keys), and the partial sums are added block after
    block in position order: the shared blocks, then the tail's. Positions a query does not
    read weigh exactly 0, so neither padding nor blocks it does not reach change any bit
    of its result."""
    heads, _, head_dim = q.shape
    kv_heads = k_pool.shape[0]
    group = heads // kv_heads
    n_sessions, width_rows = plan.session_query.shape
    n_queries = plan.query.shape[0]
    q = q.float()
    has_shared, has_tail = plan.shared_slots.shape[1] > 0, plan.tail_slots.shape[1] > 0
    parts_w, parts_v = [], []  # per query: block sums of weights [Q, kv, group, n], of values [.., n, head_dim]
    top = torch.full((kv_heads, n_queries, group), float("-inf"), device=q.device)

    if has_shared:  # one product per session for all its queries: rows = (head in group, query)
        rows = q[:, plan.session_query].view(kv_heads, group, n_sessions, width_rows, head_dim)
        rows = rows.permute(0, 2, 1, 3, 4).reshape(kv_heads, n_sessions, group * width_rows, head_dim)
        k_shared = k_pool[:, plan.shared_slots].float()  # [kv, S, NS*BLOCK, head_dim]
        v_shared = v_pool[:, plan.shared_slots].float()
        s_shared = (matmul(rows, k_shared.transpose(-1, -2)) * scale).view(kv_heads, n_sessions, group, width_rows, -1)
        s_shared = s_shared.masked_fill(~plan.shared_valid[None, :, None], float("-inf"))
        top = torch.maximum(top, s_shared.amax(-1)[:, plan.session, :, plan.row].permute(1, 0, 2))
    if has_tail:  # one product per query: rows = its heads in the group
        tail_q = q[:, plan.query].view(kv_heads, group, n_queries, head_dim).transpose(1, 2)  # [kv, Q, group, hd]
        k_tail = k_pool[:, plan.tail_slots].float()  # [kv, Q, NT*BLOCK, head_dim]
        v_tail = v_pool[:, plan.tail_slots].float()
        s_tail = matmul(tail_q, k_tail.transpose(-1, -2)) * scale  # [kv, Q, group, NT*BLOCK]
        s_tail = s_tail.masked_fill(~plan.tail_valid[None, :, None, :], float("-inf"))
        top = torch.maximum(top, s_tail.amax(-1))

    if has_shared:
        top_rows = torch.full((kv_heads, n_sessions, group, width_rows), float("inf"), device=q.device)  # padding: 0
        top_rows[:, plan.session, :, plan.row] = top.permute(1, 0, 2)
        w_shared = torch.exp(s_shared - top_rows[..., None])  # [kv, S, group, R, NS*BLOCK]
        parts_w.append(_blocks(w_shared).sum(-1)[:, plan.session, :, plan.row])  # [Q, kv, group, NS]
        # one product per (session, block): [group*R, BLOCK] @ [BLOCK, head_dim]
        a = _blocks(w_shared.reshape(kv_heads, n_sessions, group * width_rows, -1)).permute(0, 1, 3, 2, 4)
        pv = matmul(a, v_shared.unflatten(2, (-1, BLOCK)))  # [kv, S, NS, group*R, head_dim]
        pv = pv.view(kv_heads, n_sessions, -1, group, width_rows, head_dim)
        parts_v.append(pv[:, plan.session, :, :, plan.row].permute(0, 1, 3, 2, 4))  # [Q, kv, group, NS, hd]
    if has_tail:
        w_tail = torch.exp(s_tail - top[..., None])
        parts_w.append(_blocks(w_tail).sum(-1).permute(1, 0, 2, 3))  # [Q, kv, group, NT]
        pv = matmul(_blocks(w_tail).permute(0, 1, 3, 2, 4), v_tail.unflatten(2, (-1, BLOCK)))  # [kv, Q, NT, g, hd]
        parts_v.append(pv.permute(1, 0, 3, 2, 4))  # [Q, kv, group, NT, head_dim]
    total_w = total_v = None
    for weights, values in zip(parts_w, parts_v, strict=True):  # block after block, in position order
        for block in range(weights.shape[-1]):
            if total_w is None:
                total_w, total_v = weights[..., block], values[..., block, :]
            else:
                total_w = total_w + weights[..., block]
                total_v = total_v + values[..., block, :]
    out = total_v / total_w[..., None]  # [Q, kv, group, head_dim]
    return out.reshape(n_queries, heads, head_dim).transpose(0, 1)
