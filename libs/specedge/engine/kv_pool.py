"""The paged KV cache's bookkeeping: which pool slots each session holds, and the memory plan.

Pages are one token each (a *slot* of the pool), so committing an accepted path of a
tree is a page-table update: the path's slots join the session's committed pages where
they already are, and rejected nodes' slots are free again at once. For locality the
pool hands slots to sessions in *extents* of `EXTENT` consecutive slots (the attention
kernel's KV block): a session's tokens live only in its own extents, so attention visits
exactly the blocks a session owns, and an extent whose slots are all committed needs no
mask at all. A session returns its extents when it ends.

Pure Python; no tensors here. `KVPlan` turns a memory budget into a number of slots —
the verifier's capacity comes from memory, not from `max_sessions × max_len`.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field

EXTENT = 64  # slots per extent; equals the attention kernel's KV block size

TREE_ALLOWANCE = 33  # nodes of a verification tree, counted on top of a session's context

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class CacheFullError(RuntimeError):
    """No room: the pool has no free extent, or a session would exceed its limits."""


class SessionTooLongError(CacheFullError):
    """A session asked for more tokens than one session may ever hold (evicting others
    cannot help)."""


@dataclass
class SlotTable:
    """One session's pages: committed slots in position order, and the free slots of its extents."""

    extents: list[int] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)   # slot of position i
    free: list[int] = field(default_factory=list)        # heap of this session's unused slots
    committed_per_extent: dict[int, int] = field(default_factory=dict)

    def full_extents(self) -> list[int]:
        """Extents whose every slot holds a committed token (attended without a mask)."""
        return [e for e in self.extents if self.committed_per_extent.get(e, 0) == EXTENT]


class SlotPool:
    """`n_extents × EXTENT` slots shared by sessions; lowest extents are handed out first."""

    def __init__(self, n_slots: int) -> None:
        if n_slots < EXTENT:
            raise ValueError(f"the KV pool needs at least {EXTENT} slots")
        self.n_extents = n_slots // EXTENT
        self._free_extents = list(range(self.n_extents))
        heapq.heapify(self._free_extents)
        self.tables: dict[str, SlotTable] = {}

    @property
    def n_slots(self) -> int:
        return self.n_extents * EXTENT

    @property
    def free_slots(self) -> int:
        """Slots in extents no session holds (what new tokens can surely get)."""
        return len(self._free_extents) * EXTENT

    def room(self, session_id: str) -> int:
        """Slots `session_id` can still get: its own free slots plus every free extent."""
        table = self.tables.get(session_id)
        return self.free_slots + (len(table.free) if table else 0)

    def open(self, session_id: str) -> SlotTable:
        if session_id in self.tables:
            raise ValueError(f"session {session_id!r} is already open")
        table = self.tables[session_id] = SlotTable()
        return table

    def close(self, session_id: str) -> None:
        """Return every extent of the session (no-op if unknown)."""
        table = self.tables.pop(session_id, None)
        if table is not None:
            for extent in table.extents:
                heapq.heappush(self._free_extents, extent)

    def allocate(self, session_id: str, n: int) -> list[int]:
        """`n` slots for the session, lowest first, taking new extents as needed."""
        table = self.tables[session_id]
        if n > self.room(session_id):
            raise CacheFullError(f"the KV pool has no room for {n} more tokens ({self.free_slots} free)")
        while len(table.free) < n:
            extent = heapq.heappop(self._free_extents)
            table.extents.append(extent)
            for slot in range(extent * EXTENT, (extent + 1) * EXTENT):
                heapq.heappush(table.free, slot)
        return [heapq.heappop(table.free) for _ in range(n)]

    def release(self, session_id: str, slots: list[int]) -> None:
        """Slots of rejected tree nodes go back to the session's own free list."""
        table = self.tables[session_id]
        for slot in slots:
            heapq.heappush(table.free, slot)

    def commit(self, session_id: str, slots: list[int]) -> None:
        """Append slots (already holding K/V) to the session's committed pages."""
        table = self.tables[session_id]
        table.committed += slots
        for slot in slots:
            extent = slot // EXTENT
            table.committed_per_extent[extent] = table.committed_per_extent.get(extent, 0) + 1


# -- the memory plan ----------------------------------------------------------------

GIB = 1 << 30


@dataclass(frozen=True)
class KVPlan:
    """How device memory splits into weights, activations and the KV pool (one JSON line
    for operators, as vLLM prints at start)."""

    model: str
    dtype: str
    memory_bytes: int            # the device memory granted to this verifier
    weights_bytes: int
    activation_reserve_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int
    kv_tokens: int               # slots in the pool (a multiple of EXTENT)
    max_pass_tokens: int         # tree nodes and prompt tokens one pass may carry
    sessions_at: dict[str, int]  # how many sessions of a given context fit, e.g. {"4096": 64}

    def json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def kv_bytes_per_token(config, dtype: str) -> int:
    """K and V of every layer for one token: 2 × layers × KV heads × head_dim × bytes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * DTYPE_BYTES[dtype]


def activation_reserve(config, dtype: str, max_pass_tokens: int) -> int:
    """Peak transient memory of one pass: the float32 logits of every node, plus one layer's
    hidden, attention and MLP activations (an estimate; the benchmark measures the peak)."""
    width = DTYPE_BYTES[dtype]
    logits = max_pass_tokens * config.vocab_size * 4
    layer = max_pass_tokens * (4 * config.hidden_size + 3 * config.intermediate_size) * width
    return logits + layer


def plan(config, *, model: str, dtype: str, weights_bytes: int, kv_cache_memory: float,
         device_memory_bytes: int, max_pass_tokens: int = 2048,
         contexts: tuple[int, ...] = (2048, 4096, 8192)) -> KVPlan:
    """Size the KV pool. `kv_cache_memory` above 1 is GiB for the pool itself; at most 1 it
    is the fraction of the device's memory this verifier may use in all (vLLM's
    `--gpu-memory-utilization`): the pool gets what weights and activations leave."""
    per_token = kv_bytes_per_token(config, dtype)
    reserve = activation_reserve(config, dtype, max_pass_tokens)
    if kv_cache_memory > 1:
        kv_bytes = int(kv_cache_memory * GIB)
        granted = weights_bytes + reserve + kv_bytes
    elif kv_cache_memory > 0:
        granted = int(kv_cache_memory * device_memory_bytes)
        kv_bytes = granted - weights_bytes - reserve
    else:
        raise ValueError("--kv-cache-memory must be > 0 (GiB above 1, else a fraction of device memory)")
    tokens = max(0, kv_bytes) // per_token // EXTENT * EXTENT
    if tokens < EXTENT:
        raise CacheFullError(
            f"no memory left for the KV cache: {granted / GIB:.1f} GiB granted, weights take "
            f"{weights_bytes / GIB:.1f} GiB and a pass's activations {reserve / GIB:.1f} GiB")
    # a session of c tokens with a tree of TREE_ALLOWANCE nodes on top, in whole extents
    sessions = {str(c): tokens // EXTENT // math.ceil((c + TREE_ALLOWANCE) / EXTENT) for c in contexts}
    return KVPlan(model=model, dtype=dtype, memory_bytes=granted, weights_bytes=weights_bytes,
                  activation_reserve_bytes=reserve, kv_bytes_per_token=per_token, kv_bytes=tokens * per_token,
                  kv_tokens=tokens, max_pass_tokens=max_pass_tokens, sessions_at=sessions)
