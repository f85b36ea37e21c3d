"""The paged model runner: token trees of many sessions over one paged KV pool, attended
with a compiled FlexAttention kernel (`--attention flex`, the default).

Same contract as the reference `runner.ModelRunner` (open, forward over new scratch
nodes of many sessions, commit of a path with a kept subtree, prefill in chunks) and the
same logits, but shaped for a GPU:

- **K/V live in a pool of slots** per layer, `[1, kv_heads, slots, head_dim]`, sized from
  a memory budget (`kv_pool.plan`), not from `max_sessions × max_len`. Each session has a
  page table (`kv_pool.SlotTable`: one slot per token). A new node's K/V is written once,
  into a free slot of its session; committing an accepted path appends the path's slots
  to the page table and marks them committed; rejected nodes' slots are free at once.
  No K/V is ever copied.
- **Tree attention as intervals.** A pass's queries are, per session, its new tree
  nodes in the tree's pre-order; the new nodes below any node are then consecutive
  queries, so each slot carries one interval of query ranks that see it (`slot_lo`,
  `slot_hi` on the device: a committed token's spans every rank, a free slot's none, a
  tree node's the ranks of its new descendants and itself). Tokens go through the model
  packed; attention sees them as rows of queries — trees in rows as wide as the widest
  tree, prompt chunks in rows of `ROW_WIDTH`, one kernel call each — and the mask is
  `slot_lo[kv] <= rank < slot_hi[kv]` with `rank = q + row_offset[row]`. The block mask
  lists, per row, exactly the extents holding its session's tokens — fully committed
  ones unmasked — so attention reads only the session's own K/V, in place. (Inductor's
  CPU template miscompiles a 2-D query-side lookup in the mask, such as `pre[row, q]`;
  hence ranks and a row offset.)
- **No device→host synchronisation in a pass**: indices go host→device, the logits stay
  on the device for acceptance (`acceptance.accept_batch`).

Not here: which tokens are accepted (acceptance), how trees are chosen (tree), batching.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import PreTrainedModel

from specedge.engine.invariant import Kernels
from specedge.engine.kv_pool import EXTENT, CacheFullError, SlotPool, SlotTable
from specedge.engine.runner import ForwardRequest, SessionCache, TreeRunner, decoder_forward

ROW_WIDTH = 64  # queries per attention row; a longer request spans several rows
_EVERYTHING = 1 << 30  # a committed slot's interval [-1, _EVERYTHING) holds every query

_compiled_flex = None


def _flex():
    """FlexAttention compiled once per process (dynamic shapes: batch, width and the number
    of blocks vary from pass to pass without recompiling)."""
    global _compiled_flex
    if _compiled_flex is None:
        # one compiled variant per model shape and batch-size family; a process serving a
        # target and a draft (or tests with several models) needs more than dynamo's default
        # 8, past which it would fall back to eager FlexAttention (slow, and other numbers)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def tree_intervals(parents: list[int]) -> tuple[list[int], list[int]]:
    """Pre-order number and subtree end of each node of a forest (`parents[i] < i`, -1 for a
    root): a is an ancestor of q, or q itself, iff `pre[a] <= pre[q] < end[a]`."""
    size = [1] * len(parents)
    for i in range(len(parents) - 1, -1, -1):
        if parents[i] >= 0:
            size[parents[i]] += size[i]
    pre, next_child, next_root = [0] * len(parents), [0] * len(parents), 0
    for i, parent in enumerate(parents):  # parents first: each child takes the next range below its parent
        if parent < 0:
            pre[i], next_root = next_root, next_root + size[i]
        else:
            pre[i] = next_child[parent]
            next_child[parent] += size[i]
        next_child[i] = pre[i] + 1
    return pre, [p + n for p, n in zip(pre, size, strict=True)]


def query_intervals(parents: list[int], first: int) -> tuple[list[int], list[int], list[int]]:
    """The pass's queries are nodes `first..` of the tree; put them in pre-order (`order`)
    and give every node the interval [lo, hi) of query rows below it (itself included):
    a new node's descendants are contiguous in the tree's pre-order, so they are contiguous
    among the queries too. Row j sees node a iff `lo[a] <= j < hi[a]`."""
    pre, end = tree_intervals(parents)
    order = sorted(range(first, len(parents)), key=pre.__getitem__)
    ranks = [pre[node] for node in order]
    lo = [bisect.bisect_left(ranks, p) for p in pre]
    hi = [bisect.bisect_left(ranks, e) for e in end]
    return order, lo, hi


@dataclass
class PagedSession(SessionCache):
    """A session's scratch tree (parents, depths) plus the slots its nodes occupy."""

    slot: int = -1
    ancestors: torch.Tensor | None = None  # not kept: intervals replace the ancestor matrix
    table: SlotTable = None
    scratch_slots: list[int] = field(default_factory=list)


@dataclass
class _RowGroup:
    """Requests attended as rows of `width` queries in one kernel call: which packed tokens
    they are, where each lands in the [rows, width] grid, each row's first rank and extents."""

    width: int
    tokens: list[int] = field(default_factory=list)
    grid: list[int] = field(default_factory=list)
    row_offset: list[int] = field(default_factory=list)
    extents: list[tuple[list[int], list[int]]] = field(default_factory=list)

    def add(self, start: int, n: int, extents: tuple[list[int], list[int]]) -> None:
        """A request's `n` tokens, packed from `start` in rank order."""
        first_row, rows = len(self.row_offset), -(-n // self.width)
        self.tokens += range(start, start + n)
        self.grid += (first_row * self.width + j for j in range(n))  # rank j: row j // width, column j % width
        self.row_offset += range(0, rows * self.width, self.width)
        self.extents += [extents] * rows

    def prepare(self, runner: PagedRunner, device: torch.device) -> tuple:
        """(token index, grid index, rows, width, block mask) for the kernel call."""
        if len(self.row_offset) == 1:  # an empty second row: Inductor's CPU template fails on some 1-row shapes
            self.row_offset.append(0)
            self.extents.append(([], []))
        block_mask = runner._block_mask(self.extents, torch.tensor(self.row_offset, dtype=torch.int32, device=device),
                                        self.width)
        return (torch.tensor(self.tokens, device=device), torch.tensor(self.grid, device=device),
                len(self.row_offset), self.width, block_mask)


class PagedRunner(TreeRunner):
    """Sessions over a pool of `kv_tokens` slots; a session may hold up to `max_len` tokens
    (committed and scratch) and `max_scratch` tree nodes; `max_sessions` caps how many are
    open (None: as many as the pool holds)."""

    attention = "flex"

    def __init__(self, model: PreTrainedModel, kv_tokens: int, max_len: int = 1 << 20, max_scratch: int = 512,
                 prefill_chunk: int = 256, max_sessions: int | None = None) -> None:
        if prefill_chunk > max_scratch:
            raise ValueError("prefill_chunk must fit in max_scratch")
        self.model, self.config = model, model.config
        self.max_len, self.max_scratch, self.prefill_chunk = max_len, max_scratch, prefill_chunk
        self.max_sessions = max_sessions
        self.pool = SlotPool(kv_tokens)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        first = model.model.layers[0].self_attn
        self.head_dim = first.head_dim
        shape = (1, self.config.num_key_value_heads, self.pool.n_slots, self.head_dim)
        layers = len(model.model.layers)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        # each slot's interval of queries that see it: committed [-1, _EVERYTHING), free [0, 0)
        self.slot_lo = torch.zeros(self.pool.n_slots, dtype=torch.int32, device=self.device)
        self.slot_hi = torch.zeros(self.pool.n_slots, dtype=torch.int32, device=self.device)
        self.sessions: dict[str, PagedSession] = {}
        self.kernels = self._kernels(model)
        self.kv_bytes_copied = 0  # as the reference counts it; nothing here copies K/V
        self.kv_token_bytes = 2 * layers * self.config.num_key_value_heads * self.head_dim * \
            self.k_cache[0].element_size()

    @staticmethod
    def _kernels(model: PreTrainedModel) -> Kernels:
        return Kernels.standard(model)

    # -- sessions -------------------------------------------------------------------

    def open(self, session_id: str) -> PagedSession:
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open")
        if self.max_sessions is not None and len(self.sessions) >= self.max_sessions:
            raise CacheFullError(f"all {self.max_sessions} sessions are in use")
        cache = self.sessions[session_id] = PagedSession(table=self.pool.open(session_id))
        return cache

    def evict(self, session_id: str) -> None:
        """Forget a session and return its extents (no-op if unknown)."""
        cache = self.sessions.pop(session_id, None)
        if cache is not None:
            self._set_intervals(cache.table.committed + cache.scratch_slots, [], [])
            self.pool.close(session_id)

    @property
    def free_tokens(self) -> int:
        """Slots no session holds: the capacity a verifier announces."""
        return self.pool.free_slots

    def can_hold(self, n_tokens: int) -> bool:
        """Whether a new session of `n_tokens` (plus a tree) fits now."""
        if self.max_sessions is not None and len(self.sessions) >= self.max_sessions:
            return False
        return n_tokens <= self.max_len and -(-(n_tokens + 1) // EXTENT) <= self.pool.free_slots // EXTENT

    def reserve(self, session_id: str, n_tokens: int) -> None:
        """Take the extents `n_tokens` more tokens of the session will need now, so that a
        prompt admitted is never refused half-way through its prefill."""
        table = self.pool.tables[session_id]
        if n_tokens > len(table.free):
            self.pool.release(session_id, self.pool.allocate(session_id, n_tokens))

    def free_positions(self, session_id: str) -> int:
        cache = self.sessions[session_id]
        return min(self.max_len - cache.prefix_len - cache.n_scratch, self.pool.room(session_id))

    # -- forward --------------------------------------------------------------------

    def _check(self, requests: list[ForwardRequest], caches: list[PagedSession]) -> None:
        extents_needed = 0
        for r, c in zip(requests, caches, strict=True):
            self._check_request(r, c)
            extents_needed += max(0, -(-(len(r.tokens) - len(c.table.free)) // EXTENT))
        if len({r.session_id for r in requests}) != len(requests):
            raise ValueError("one request per session per pass")
        if extents_needed * EXTENT > self.pool.free_slots:
            raise CacheFullError(f"the KV pool has no room for this pass ({self.pool.free_slots} slots free)")

    @torch.inference_mode()
    def forward(self, requests: list[ForwardRequest], packed: bool = False,
                logits_of: int | None = None) -> list[torch.Tensor] | torch.Tensor:
        """One forward pass over new scratch nodes of several sessions.

        Returns, per request, the logits of its new nodes: [len(tokens), vocab] (float32,
        on the device; views of one tensor); `packed`: that one [total new nodes, vocab]
        tensor, requests in order; `logits_of`: only the first that many requests' logits
        (the rest — prompt chunks — only fill the cache, and skip the lm_head).
        """
        caches = [self.sessions[r.session_id] for r in requests]
        self._check(requests, caches)
        n_new = [len(r.tokens) for r in requests]
        # tokens go through the model packed, [1, total], each request's in its tree's pre-order
        ids, pos, out_index, write_slots = [], [], [], []
        tree_slots, tree_lo, tree_hi = [], [], []
        batch = []  # (session, its queries' nodes in pre-order, first packed index)
        for b, (r, c) in enumerate(zip(requests, caches, strict=True)):
            first = c.n_scratch
            for parent in r.parents:
                c._append(parent)
            slots = self.pool.allocate(r.session_id, n_new[b])
            c.scratch_slots += slots
            order, lo, hi = query_intervals(c.parents, first)  # a node added can renumber the whole tree
            rank = {node: j for j, node in enumerate(order)}
            tree_slots += c.scratch_slots
            tree_lo += lo
            tree_hi += hi
            start = len(ids)
            ids += [r.tokens[node - first] for node in order]
            pos += [c.prefix_len + c.depths[node] for node in order]
            write_slots += [c.scratch_slots[node] for node in order]
            out_index += (start + rank[node] for node in range(first, first + n_new[b]))
            batch.append((c, order, start))
        dev = self.device
        input_ids = torch.tensor(ids, device=dev)[None]
        positions = torch.tensor(pos, device=dev)[None]
        slots_t = torch.tensor(write_slots, device=dev)
        self._set_intervals(tree_slots, tree_lo, tree_hi)
        attend_packed = self._attention(batch)

        def attend(index, attn, q, k, v):  # q, k, v: [1, heads, total, head_dim]
            # write the new nodes' K/V into their slots, then attend over the pool in place
            self.k_cache[index][0].index_copy_(1, slots_t, k[0])
            self.v_cache[index][0].index_copy_(1, slots_t, v[0])
            return attend_packed(index, attn, q[0])[None]

        self.kernels.reserve(max(pos) + 1)
        hidden = decoder_forward(self.model, input_ids, positions, attend, self.kernels)[0]
        wanted = n_new if logits_of is None else n_new[:logits_of]
        out_rows = torch.tensor(out_index[: sum(wanted)], dtype=torch.long, device=dev)
        head = self.model.lm_head
        logits = self.kernels.linear(hidden[out_rows], head.weight, head.bias).float()
        return logits if packed else list(logits.split(wanted))

    def _attention(self, batch: list[tuple[PagedSession, list[int], int]]):
        """`attend(layer, attn, q) -> out` over the pass's packed queries ([heads, total,
        head_dim]) for `batch` (session, its queries' nodes in pre-order, first packed
        index): trees in rows as wide as the widest tree, longer requests (prompt chunks) in
        rows of ROW_WIDTH — two kernel calls, so neither pads the other."""
        widest = max((len(order) for _, order, _ in batch if len(order) <= ROW_WIDTH), default=1)
        groups = {"trees": _RowGroup(widest), "chunks": _RowGroup(ROW_WIDTH)}
        for c, order, start in batch:
            # the extents holding its tokens (reserved, still empty ones are not visited);
            # those whose every slot is committed need no mask
            full = c.table.full_extents()
            partial = sorted((c.table.committed_per_extent.keys() | {slot // EXTENT for slot in c.scratch_slots})
                             - set(full))
            groups["trees" if len(order) <= ROW_WIDTH else "chunks"].add(start, len(order), (partial, full))
        calls = [group.prepare(self, self.device) for group in groups.values() if group.tokens]
        flex = _flex()

        def attend(index, attn, q):
            heads, packed = q.shape[0], q.transpose(0, 1)  # [total, heads, head_dim]
            out = packed if len(calls) == 1 else torch.empty_like(packed)
            for tokens, grid, rows, width, block_mask in calls:
                queries = packed.new_zeros(rows * width, heads, self.head_dim).index_copy_(0, grid, packed[tokens])
                attended = flex(queries.view(rows, width, heads, -1).transpose(1, 2), self.k_cache[index],
                                self.v_cache[index], block_mask=block_mask, scale=attn.scaling, enable_gqa=True)
                result = attended.transpose(1, 2).reshape(rows * width, heads, -1)[grid]
                if len(calls) == 1:
                    return result.transpose(0, 1)
                out.index_copy_(0, tokens, result)
            return out.transpose(0, 1)

        return attend

    def _set_intervals(self, slots: list[int], lo: list[int], hi: list[int]) -> None:
        """Give `slots` the intervals lo/hi; slots beyond those lists are freed."""
        if not slots:
            return
        free = len(slots) - len(lo)
        index = torch.tensor(slots, device=self.device)
        self.slot_lo[index] = torch.tensor(lo + [0] * free, dtype=torch.int32, device=self.device)
        self.slot_hi[index] = torch.tensor(hi + [0] * free, dtype=torch.int32, device=self.device)

    def _block_mask(self, extents: list[tuple[list[int], list[int]]], row_offset: torch.Tensor,
                    width: int) -> BlockMask:
        """Per query row, the extents its session owns: fully committed ones attended
        without a mask, the others through the tree mask — the query in column q of a row
        whose first query has rank `row_offset` sees slot kv when its rank falls in the
        slot's interval."""
        q_blocks = -(-width // EXTENT)

        def blocks(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            indices = torch.zeros(len(lists), 1, 1, self.pool.n_extents, dtype=torch.int32)  # room for every block
            for b, owned in enumerate(lists):
                indices[b, 0, 0, : len(owned)] = torch.tensor(owned, dtype=torch.int32)
            counts = torch.tensor([len(owned) for owned in lists], dtype=torch.int32)[:, None, None]
            return (counts.expand(-1, 1, q_blocks).contiguous().to(self.device),
                    indices.expand(-1, 1, q_blocks, -1).contiguous().to(self.device))

        lo, hi = self.slot_lo, self.slot_hi

        def tree_mask(b, h, q, kv):
            rank = q + row_offset[b]
            return (lo[kv] <= rank) & (rank < hi[kv])

        return BlockMask.from_kv_blocks(*blocks([p for p, _ in extents]), *blocks([f for _, f in extents]),
                                        BLOCK_SIZE=EXTENT, mask_mod=tree_mask,
                                        seq_lengths=(width, self.pool.n_slots), compute_q_blocks=False)

    def warm_up(self) -> None:
        """Compile the attention kernel for the shape families a service meets (one row and
        several, one query per row and several) before it takes traffic, so no request
        waits for a compilation."""
        cap, self.max_sessions = self.max_sessions, None
        names = [f"__warm_up_{i}" for i in range(3)]
        try:
            for name in names:
                self.open(name)
            self.forward([ForwardRequest(names[0], [1, 2, 3], [-1, 0, 1])])
            for width in (1, 4):
                self.forward([ForwardRequest(name, [1] * width, [-1] * width) for name in names])
        finally:
            self.max_sessions = cap
            for name in names:
                self.evict(name)

    # -- committing -------------------------------------------------------------------

    def commit(self, session_id: str, path: list[int], keep: list[int] = ()) -> None:
        """Commit scratch `path` (a chain from a depth-0 node) and keep the subtree `keep`
        hanging below its last node (or below the prefix end when the path is empty) as the
        new scratch, in the given order (parents first); every other node's slot is freed.
        A page-table update: no K/V moves."""
        c = self.sessions[session_id]
        new_index = self._check_commit(c, path, keep)
        path_slots = [c.scratch_slots[i] for i in path]
        keep_slots = [c.scratch_slots[i] for i in keep]
        moved = set(path) | set(keep)
        dropped = [slot for i, slot in enumerate(c.scratch_slots) if i not in moved]
        self.pool.commit(session_id, path_slots)
        self.pool.release(session_id, dropped)
        c.scratch_slots = keep_slots
        self._rebuild_scratch(c, path, keep, new_index)
        # kept nodes get their intervals when the session is next in a pass
        self._set_intervals(path_slots + dropped, [-1] * len(path_slots), [_EVERYTHING] * len(path_slots))
