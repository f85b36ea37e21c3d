"""What the scheduler learns about time: verification cost and each edge's turnaround.

Pure and clock-free: callers pass durations measured on one process's own monotonic
clock (the verifier times its forward pass; the scheduler times a session's turnaround —
from sending a result to receiving the next draft; the edge times its own drafting).
Clocks of different machines are never compared.

- `VerificationCost`: verification time as a function of tree nodes in a batch,
  `seconds ≈ base_s + per_node_s × nodes`, fitted by least squares over recent batches.
- `EdgeTiming`: per edge, exponentially weighted turnaround, drafting time per tree
  level, and the rest (network round trip and queueing).
"""

from __future__ import annotations

import contextlib
import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class VerificationCost:
    """`seconds ≈ base_s + per_node_s × nodes` over the last 64 batches."""

    base_s: float = 0.05
    per_node_s: float = 0.0
    _samples: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=64))

    def add(self, nodes: int, seconds: float) -> None:
        self._samples.append((nodes, seconds))
        xs, ys = zip(*self._samples, strict=True)
        with contextlib.suppress(statistics.StatisticsError):  # one batch size so far: keep the slope
            self.per_node_s = max(0.0, statistics.linear_regression(xs, ys).slope)
        self.base_s = max(1e-6, statistics.fmean(ys) - self.per_node_s * statistics.fmean(xs))

    def seconds(self, nodes: int) -> float:
        return self.base_s + self.per_node_s * nodes

    @property
    def samples(self) -> int:
        return len(self._samples)


@dataclass
class EdgeTiming:
    """One edge's measured turnaround, split into drafting (per tree level) and the rest."""

    alpha: float = 0.2  # weight of the newest timing sample
    # Weight of the newest tree in `accepted_per_tree`: slow, because it judges an edge (a
    # fast average of an honest edge's small trees, often accepting nothing, dips below
    # `Tuning.useless_below` by chance within seconds; at 0.05 that takes ~28 empty trees
    # in a row, while an edge that never helps is judged after `judge_after` trees as before).
    acceptance_alpha: float = 0.05
    turnaround_s: float | None = None
    peak_s: float | None = None  # recent worst turnaround (decays 10% per sample): the draft deadline's base
    draft_s_per_level: float | None = None
    rest_s: float | None = None  # turnaround minus drafting: round trip and queueing
    levels_tried: float = 0.0  # decayed counts of tree levels offered and accepted,
    levels_accepted: float = 0.0  # for the per-level acceptance estimate
    verifications: int = 0  # trees of this edge verified
    accepted_per_tree: float = 0.0  # accepted drafted tokens per verified tree (weighted to the recent)

    def add(self, turnaround_s: float, draft_s: float, depth: int) -> None:
        def ewma(old: float | None, new: float) -> float:
            return new if old is None else (1 - self.alpha) * old + self.alpha * new

        self.turnaround_s = ewma(self.turnaround_s, turnaround_s)
        self.peak_s = turnaround_s if self.peak_s is None else max(turnaround_s, 0.9 * self.peak_s)
        self.rest_s = ewma(self.rest_s, max(0.0, turnaround_s - draft_s))
        if depth > 0:
            self.draft_s_per_level = ewma(self.draft_s_per_level, draft_s / depth)

    def verified(self, depth: int, new_tokens: int) -> None:
        """A tree of `depth` levels gave `new_tokens` (accepted path + bonus)."""
        accepted = min(new_tokens - 1, depth)
        self.verifications += 1
        weight = max(self.acceptance_alpha, 1 / self.verifications)  # the plain mean, then an EWMA
        self.accepted_per_tree += weight * (new_tokens - 1 - self.accepted_per_tree)
        self.levels_tried = 0.98 * self.levels_tried + min(accepted + 1, depth)
        self.levels_accepted = 0.98 * self.levels_accepted + accepted

    @property
    def acceptance(self) -> float:
        """Estimated chance that a tree level is accepted given the one above was (0.7 before data)."""
        if self.levels_tried < 5:
            return 0.7
        return min(0.99, self.levels_accepted / self.levels_tried)

    def best_depth(self, verify_s: float, other_groups_s: float, max_depth: int) -> int:
        """The depth with the most expected tokens per second of this edge's cycle.

        A cycle lasts the verification plus the longer of the other groups' verification and
        this edge's turnaround (round trip + drafting at that depth); expected tokens at depth
        d are 1 + a + … + a^d with `a` the measured per-level acceptance."""
        if self.rest_s is None or self.draft_s_per_level is None:
            return max_depth
        a = self.acceptance

        def rate(d: int) -> float:
            tokens = sum(a ** k for k in range(d + 1))
            return tokens / (verify_s + max(other_groups_s, self.rest_s + d * self.draft_s_per_level))

        return max(range(1, max_depth + 1), key=rate)
