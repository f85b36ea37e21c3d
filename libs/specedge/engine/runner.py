"""The model runner: per-session KV caches and one batched forward over token trees.

Owns the KV cache of many sessions at once and the forward pass that serves prefill,
draft-tree growth and tree verification alike. It does not know what a draft is or how
tokens are accepted — the tree builder and the acceptance rule are separate.

Cache layout (slot-based). Each session holds one slot of `max_len` positions per layer:

    [0, prefix_len)                       committed tokens, contiguous, in order
    [prefix_len, prefix_len + n_scratch)  the *scratch tree*: tokens processed but not yet
                                          committed (a draft tree, a verification tree)

Scratch node i has a parent (a scratch index, or -1 for "the end of the prefix"), a
depth (0 for parent -1) and the absolute position `prefix_len + depth` used for RoPE.
A forward appends new scratch nodes for any number of sessions — each with its own cache
length and its own tree — in one pass: every new node attends to its session's whole
prefix and to its scratch ancestors (itself included). `commit()` then moves a chosen
root-to-node path to the end of the prefix (contiguous) and can keep a subtree hanging
below it as the new scratch (proactive drafting reuses it); everything else is dropped.

The forward reuses the Hugging Face modules of the model (embeddings, norms, projections,
MLPs, rotary embedding) and replaces only attention's cache handling, so its logits match
`model(input_ids)` to float tolerance. Supported: Qwen3, Qwen2 and Llama families.
Gathering the batch's slots costs one copy of their K/V per layer per pass unless they
are contiguous (a single session always is: its pass attends to a view of its slot), and
a commit moves the accepted path's K/V (`kv_bytes_copied` counts both). This is the
reference backend (`--attention reference`); `paged_runner.PagedRunner` is the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from specedge.engine.invariant import Kernels
from specedge.engine.kv_pool import CacheFullError, SessionTooLongError

__all__ = ["CacheFullError", "ForwardRequest", "ModelRunner", "SessionCache", "SessionTooLongError",
           "decoder_forward"]


@dataclass
class SessionCache:
    """Bookkeeping of one session's slot (the K/V tensors live in the runner)."""

    slot: int
    ancestors: torch.Tensor  # [max_scratch, max_scratch] bool: row i marks i's ancestors and i
    prefix_len: int = 0
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)

    @property
    def n_scratch(self) -> int:
        return len(self.parents)

    def _append(self, parent: int) -> None:
        index = len(self.parents)
        if not -1 <= parent < index:
            raise ValueError(f"parent {parent} of scratch node {index} is not an earlier node")
        self.parents.append(parent)
        self.depths.append(0 if parent < 0 else self.depths[parent] + 1)
        if self.ancestors is None:  # the paged runner keeps no ancestor matrix
            return
        if parent < 0:
            self.ancestors[index].zero_()
        else:
            self.ancestors[index] = self.ancestors[parent]
        self.ancestors[index, index] = True


@dataclass(frozen=True)
class ForwardRequest:
    """New scratch nodes for one session: tokens and parents (scratch indices or -1)."""

    session_id: str
    tokens: list[int]
    parents: list[int]


class TreeRunner:
    """What every runner does the same way over its `sessions` (scratch trees): checking a
    commit before it changes anything, dropping a scratch tree, prefilling in chunks."""

    sessions: dict[str, SessionCache]
    prefill_chunk: int

    def forward(self, requests: list[ForwardRequest]) -> list[torch.Tensor]:
        raise NotImplementedError

    def commit(self, session_id: str, path: list[int], keep: list[int] = ()) -> None:
        raise NotImplementedError

    max_len: int
    max_scratch: int

    def _check_request(self, r: ForwardRequest, c: SessionCache) -> None:
        """Refuse a request the session's limits or tree cannot take (before any change)."""
        if len(r.tokens) != len(r.parents) or not r.tokens:
            raise ValueError("each request needs as many parents as tokens, and at least one")
        if c.n_scratch + len(r.tokens) > self.max_scratch:
            raise SessionTooLongError(f"scratch tree of {r.session_id!r} would exceed {self.max_scratch} nodes")
        if c.prefix_len + c.n_scratch + len(r.tokens) > self.max_len:
            raise SessionTooLongError(f"session {r.session_id!r} would exceed {self.max_len} positions")
        if any(not -1 <= p < c.n_scratch + j for j, p in enumerate(r.parents)):
            raise ValueError(f"request for {r.session_id!r}: every parent must be -1 or an earlier node")

    def _check_commit(self, c: SessionCache, path: list[int], keep: list[int]) -> dict[int, int]:
        """Refuse a path that is not a chain from the prefix end, or kept nodes that do not
        hang below it (parents first); returns each kept node's new scratch index."""
        for i, node in enumerate(path):
            expected = path[i - 1] if i else -1
            if not 0 <= node < c.n_scratch or c.parents[node] != expected:
                raise ValueError(f"commit path is not a chain from the prefix end at node {node}")
        attach = path[-1] if path else -1
        new_index = {old: new for new, old in enumerate(keep)}
        for old in keep:
            parent = c.parents[old] if 0 <= old < c.n_scratch else None
            if parent != attach and not (parent in new_index and new_index[parent] < new_index[old]):
                raise ValueError(f"kept node {old} does not hang below the committed path")
        return new_index

    def _rebuild_scratch(self, c: SessionCache, path: list[int], keep: list[int], new_index: dict[int, int]) -> None:
        """After a commit: the prefix grows by the path, the kept nodes are the new scratch."""
        attach = path[-1] if path else -1
        old_parents = c.parents
        c.prefix_len += len(path)
        c.parents, c.depths = [], []
        for old in keep:
            parent = old_parents[old]
            c._append(-1 if parent == attach else new_index[parent])

    def rollback_scratch(self, session_id: str) -> None:
        """Drop every scratch node (nothing committed)."""
        self.commit(session_id, [])

    def prefill(self, session_id: str, tokens: list[int]) -> torch.Tensor | None:
        """Commit `tokens` to the session's prefix in chunks; returns the last token's logits."""
        last = None
        for start in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[start : start + self.prefill_chunk]
            last = self.forward([ForwardRequest(session_id, chunk, list(range(-1, len(chunk) - 1)))])[0][-1]
            self.commit(session_id, list(range(len(chunk))))
        return last


class ModelRunner(TreeRunner):
    """KV caches for up to `max_sessions` sessions of up to `max_len` tokens each."""

    def __init__(self, model: PreTrainedModel, max_sessions: int = 8, max_len: int = 4096,
                 max_scratch: int = 512, prefill_chunk: int = 256) -> None:
        if prefill_chunk > max_scratch:
            raise ValueError("prefill_chunk must fit in max_scratch")
        self.model = model
        self.config = model.config
        self.max_sessions, self.max_len = max_sessions, max_len
        self.max_scratch, self.prefill_chunk = max_scratch, prefill_chunk
        first = model.model.layers[0].self_attn
        self.head_dim = first.head_dim
        n_kv = self.config.num_key_value_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        shape = (max_sessions, n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in model.model.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in model.model.layers]
        self.sessions: dict[str, SessionCache] = {}
        self.kv_bytes_copied = 0  # K/V copied beyond writing new nodes: gathers for attention, commits
        self._kv_token_bytes = 2 * len(model.model.layers) * n_kv * self.head_dim * self.k_cache[0].element_size()
        self._free_slots = list(range(max_sessions - 1, -1, -1))

    # -- sessions -------------------------------------------------------------------

    def open(self, session_id: str) -> SessionCache:
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open")
        if not self._free_slots:
            raise CacheFullError(f"all {self.max_sessions} cache slots are in use")
        ancestors = torch.zeros(self.max_scratch, self.max_scratch, dtype=torch.bool)
        cache = self.sessions[session_id] = SessionCache(slot=self._free_slots.pop(), ancestors=ancestors)
        return cache

    def evict(self, session_id: str) -> None:
        """Forget a session and free its slot (no-op if unknown)."""
        cache = self.sessions.pop(session_id, None)
        if cache is not None:
            self._free_slots.append(cache.slot)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def free_tokens(self) -> int:
        """Tokens new sessions can still take: the free slots' positions, less a tree each."""
        return self.free_slots * (self.max_len - self.max_scratch)

    def warm_up(self) -> None:
        """Nothing to compile."""

    def reserve(self, session_id: str, n_tokens: int) -> None:
        """Nothing to do: a session's slot always holds `max_len` positions."""

    def can_hold(self, n_tokens: int) -> bool:
        """Whether a new session of `n_tokens` fits now (a free slot long enough)."""
        return bool(self._free_slots) and n_tokens <= self.max_len

    def free_positions(self, session_id: str) -> int:
        cache = self.sessions[session_id]
        return self.max_len - cache.prefix_len - cache.n_scratch

    # -- forward --------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, requests: list[ForwardRequest], packed: bool = False,
                logits_of: int | None = None) -> list[torch.Tensor] | torch.Tensor:
        """One forward pass over new scratch nodes of several sessions.

        Returns, per request, the logits of its new nodes: [len(tokens), vocab] (float32);
        `packed`: all of them as one [total new nodes, vocab] tensor, requests in order;
        `logits_of`: only the first that many requests' logits (the rest only fill the cache).
        """
        caches = [self.sessions[r.session_id] for r in requests]
        for r, c in zip(requests, caches, strict=True):
            self._check_request(r, c)
        n_new = [len(r.tokens) for r in requests]
        batch, width = len(requests), max(n_new)
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        write_slot, write_pos = [], []
        spans = []  # (prefix_len, first new scratch index) per request
        for b, (r, c) in enumerate(zip(requests, caches, strict=True)):
            first = c.n_scratch
            for parent in r.parents:
                c._append(parent)
            input_ids[b, : n_new[b]] = torch.tensor(r.tokens)
            positions[b, : n_new[b]] = c.prefix_len + torch.tensor(c.depths[first:])
            write_slot += [c.slot] * n_new[b]
            write_pos += range(c.prefix_len + first, c.prefix_len + first + n_new[b])
            spans.append((c.prefix_len, first))
        length = max(c.prefix_len + c.n_scratch for c in caches)
        mask = torch.zeros(batch, width, length, dtype=torch.bool)
        for b, c in enumerate(caches):
            prefix, first = spans[b]
            end = first + n_new[b]
            mask[b, : n_new[b], :prefix] = True
            mask[b, : n_new[b], prefix : prefix + end] = c.ancestors[first:end, :end]
        valid = torch.arange(width)[None, :] < torch.tensor(n_new)[:, None]
        mask[..., 0] |= ~valid  # padding rows attend somewhere (no NaN); their output is dropped

        dev = self.device
        input_ids, positions, mask, valid = (t.to(dev) for t in (input_ids, positions, mask, valid))
        first_slot = caches[0].slot
        if [c.slot for c in caches] == list(range(first_slot, first_slot + batch)):
            slots = slice(first_slot, first_slot + batch)  # contiguous (one session, say): attend to a view
        else:
            slots = torch.tensor([c.slot for c in caches], device=dev)
        write_slot_t = torch.tensor(write_slot, device=dev)
        write_pos_t = torch.tensor(write_pos, device=dev)
        logits = self._forward(input_ids, positions, mask[:, None], valid, slots, write_slot_t, write_pos_t, length)
        out = [logits[b, : n_new[b]].float() for b in range(batch if logits_of is None else logits_of)]
        return (torch.cat(out) if out else logits.new_zeros(0, logits.shape[-1]).float()) if packed else out

    def _forward(self, input_ids, positions, mask, valid, slots, write_slot, write_pos, length) -> torch.Tensor:
        def attend(index, attn, q, k, v):
            # Store the new keys/values in each session's slot, then attend over the slots (a
            # view when they are contiguous, else a gathered copy).
            self.k_cache[index][write_slot, :, write_pos] = k.transpose(1, 2)[valid]
            self.v_cache[index][write_slot, :, write_pos] = v.transpose(1, 2)[valid]
            keys = self.k_cache[index][slots, :, :length]
            values = self.v_cache[index][slots, :, :length]
            if isinstance(slots, torch.Tensor):  # gathered, not a view
                self.kv_bytes_copied += 2 * keys.numel() * keys.element_size()
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                                  enable_gqa=True)

        return self.model.lm_head(decoder_forward(self.model, input_ids, positions, attend))

    # -- committing -------------------------------------------------------------------

    def commit(self, session_id: str, path: list[int], keep: list[int] = ()) -> None:
        """Move scratch `path` (a chain from a depth-0 node) to the end of the prefix.

        `keep` lists scratch nodes of a subtree hanging below the path's last node (or
        below the prefix end when the path is empty); they stay as the new scratch tree,
        in the given order (parents first). Everything else in scratch is dropped.
        """
        c = self.sessions[session_id]
        new_index = self._check_commit(c, path, keep)
        moved = list(path) + list(keep)
        if moved:
            src = torch.tensor(moved, device=self.device) + c.prefix_len
            dst = torch.arange(len(moved), device=self.device) + c.prefix_len
            for cache in (*self.k_cache, *self.v_cache):
                cache[c.slot, :, dst] = cache[c.slot, :, src]  # advanced indexing reads a copy first
            self.kv_bytes_copied += len(moved) * self._kv_token_bytes
        self._rebuild_scratch(c, path, keep, new_index)


def decoder_forward(model: PreTrainedModel, input_ids: torch.Tensor, positions: torch.Tensor, attend,
                    kernels: Kernels | None = None) -> torch.Tensor:
    """The decoder stack of a Hugging Face Qwen3/Qwen2/Llama model with attention left to
    `attend(layer_index, attn_module, q, k, v) -> out` (all [batch, heads, width, head_dim],
    q and k already rotated) and the projections, MLPs and rotary embedding to `kernels`
    (default: the model's own modules); returns the final-normed hidden states
    [batch, width, hidden]."""
    kernels = kernels or Kernels.standard(model)
    linear = kernels.linear
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    cos, sin = kernels.rotary(hidden, positions)
    batch, width, _ = hidden.shape
    for index, layer in enumerate(inner.layers):
        attn = layer.self_attn
        residual = hidden
        x = layer.input_layernorm(hidden)
        q = linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, width, -1, attn.head_dim)
        k = linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, width, -1, attn.head_dim)
        v = linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, width, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _apply_rope(q, k, cos, sin)
        out = attend(index, attn, q, k, v)
        o_proj = attn.o_proj
        hidden = residual + linear(out.transpose(1, 2).reshape(batch, width, -1), o_proj.weight, o_proj.bias)
        hidden = hidden + kernels.mlp(layer.mlp, layer.post_attention_layernorm(hidden))
    return inner.norm(hidden)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
