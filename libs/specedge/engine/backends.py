"""Which model runner serves a party: the attention backend and the size of its KV cache.

`exact` (the default): `exact_runner.ExactRunner`, the paged KV pool with batch-invariant
kernels — every token's logits bit for bit those of the token decoded alone. `flex`:
`paged_runner.PagedRunner`, the same pool attended with compiled FlexAttention — faster,
exact only to float rounding (`--fast`). `reference`: `runner.ModelRunner`, a dense slot
per session attended with SDPA and a boolean mask — the plain path the others are tested
against.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from specedge.engine.exact_runner import ExactRunner
from specedge.engine.kv_pool import EXTENT
from specedge.engine.paged_runner import PagedRunner
from specedge.engine.runner import ModelRunner

ATTENTION_BACKENDS = ("exact", "flex", "reference")
DEFAULT_ATTENTION = "exact"


def make_runner(model: PreTrainedModel, *, attention: str = DEFAULT_ATTENTION, max_sessions: int, max_len: int,
                max_scratch: int, kv_tokens: int | None = None) -> ModelRunner | PagedRunner:
    """A runner for sessions of up to `max_len` positions (committed and scratch) and trees
    of `max_scratch` nodes. The paged pool holds `kv_tokens` slots (from a memory plan);
    without one, as many as `max_sessions` full sessions need, and at most that many are
    open at once."""
    if attention == "reference":
        return ModelRunner(model, max_sessions=max_sessions, max_len=max_len, max_scratch=max_scratch)
    if attention not in ("exact", "flex"):
        raise ValueError(f"unknown attention backend {attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    paged = ExactRunner if attention == "exact" else PagedRunner
    if kv_tokens is None:  # a session wastes at most two partial extents (committed, and its tree)
        return paged(model, kv_tokens=max_sessions * (max_len + 2 * EXTENT), max_len=max_len,
                     max_scratch=max_scratch, max_sessions=max_sessions)
    return paged(model, kv_tokens=kv_tokens, max_len=max_len, max_scratch=max_scratch)
