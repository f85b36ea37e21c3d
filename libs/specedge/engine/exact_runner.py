"""The exact runner (`--attention exact`, the default): the paged runner with batch-invariant
kernels, so every token's logits are bit for bit those of the same token decoded alone.

Same pool, page tables, commits and contract as `paged_runner.PagedRunner`; what changes
is how a pass computes:

- projections, MLPs, the lm_head and rotary embeddings use `invariant.Kernels.invariant`;
- attention is `invariant.attend_in_order`: each query reduces over its keys in position
  order — the session's committed tokens, then its tree ancestors and itself — in blocks
  of `invariant.BLOCK` positions, whichever slots of the pool hold them. A node verified
  in a tree of any shape, beside any other sessions, over a cache prefilled in any chunks
  (or re-prefilled after an eviction, or by another verifier) gets the logits that the
  `autoregressive` mode computes for it one token per pass.

The price is speed: attention gathers each run of keys in position order and pads small
products (docs/benchmarks.md, "Exactness"); `--attention flex` (`--fast`) trades exactness
for it.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from specedge.engine.invariant import BLOCK, Kernels, QueryPlan, attend_in_order, plan_queries
from specedge.engine.paged_runner import ROW_WIDTH, PagedRunner, PagedSession


def _chains(c: PagedSession, order: list[int]) -> list[list[int]]:
    """Per query node (in `order`), the slots of its scratch ancestors from the root down to
    itself: its positions after the committed tokens, in order."""
    memo: dict[int, list[int]] = {}

    def chain(node: int) -> list[int]:
        if node not in memo:
            parent = c.parents[node]
            memo[node] = (chain(parent) if parent >= 0 else []) + [c.scratch_slots[node]]
        return memo[node]

    for node in sorted(order):  # parents come before children: no deep recursion
        chain(node)
    return [memo[node] for node in order]


class ExactRunner(PagedRunner):
    """A `PagedRunner` whose every logit is independent of the pass it was computed in."""

    attention = "exact"

    @staticmethod
    def _kernels(model: PreTrainedModel) -> Kernels:
        return Kernels.invariant(model)

    def _attention(self, batch: list[tuple[PagedSession, list[int], int]]):
        # trees and prompt chunks in separate groups, so a chunk's many queries do not pad
        # every tree's rows (the result is the same either way; only the work differs)
        groups: dict[bool, list] = {True: [], False: []}
        for c, order, start in batch:
            groups[len(order) <= ROW_WIDTH].append(
                (c.table.committed, list(range(start, start + len(order))), _chains(c, order)))
        plans: list[QueryPlan] = [plan_queries(sessions, self.device) for sessions in groups.values() if sessions]

        def attend(index, attn, q):  # q: [heads, total, head_dim]
            out = q.new_empty(q.shape)
            for plan in plans:
                out[:, plan.query] = attend_in_order(q, self.k_cache[index][0], self.v_cache[index][0], plan,
                                                     attn.scaling).to(q.dtype)
            return out

        return attend

    def _set_intervals(self, slots: list[int], lo: list[int], hi: list[int]) -> None:
        """Nothing to label: attention reads keys by position, not through the flex mask."""

    def warm_up(self) -> None:
        """Nothing to compile."""


__all__ = ["BLOCK", "ExactRunner"]
