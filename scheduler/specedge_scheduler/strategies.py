"""Batching strategies: how a free verifier's next batch is chosen, how many phase groups its
sessions form, and (pipeline) the tree shape each edge is asked for.

Each is a small class bound to one `SchedulingPolicy`, whose sessions, queues and timings it
reads; `STRATEGIES` maps the names the command line takes to them.

- `Fifo`: whenever a verifier is free, the oldest queued trees (up to `max_batch`).
- `TwoGroups`: the reference implementation's — sessions split into two groups that
  alternate strictly; a group's batch waits for all its drafts (up to `group_wait_s`).
- `Pipeline`: sessions in K phase groups so that while one group is verified the others
  draft — K the fewest whose predicted cycle is within `group_tolerance` of the shortest;
  the group with the oldest ready tree goes next, waiting for its drafts due soon — an
  idle verifier half a verification at most (`slack`); with two groups or more, each
  edge's next depth is the one with the most expected tokens per second of its cycle,
  from its measured turnaround, drafting time and acceptance
  (`timing.EdgeTiming.best_depth`); under heavy load (the verifier busy `saturated` of a
  cycle) trees shrink so the batch's nodes cost at most `node_cost_share` of a pass
  (verification cost grows with batch × nodes).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING, ClassVar, Literal

from specedge.protocol import DraftTreeMsg
from specedge_scheduler.timing import EdgeTiming

if TYPE_CHECKING:
    from specedge_scheduler.policy import SchedulingPolicy, SessionState

Strategy = Literal["fifo", "two-groups", "pipeline"]


class BatchStrategy:
    """What every strategy answers; the base verifies in one group with a fixed tree shape."""

    name: ClassVar[Strategy]

    def __init__(self, policy: SchedulingPolicy) -> None:
        self.policy = policy

    def groups(self, verifier: str) -> int:
        """How many phase groups the verifier's sessions form."""
        return 1

    def batch(self, verifier: str, queue: deque[DraftTreeMsg], now: float) -> list[DraftTreeMsg]:
        """Take the trees to verify now from the verifier's (non-empty) queue; [] means wait."""
        raise NotImplementedError

    def wake(self, verifier: str, since: float) -> float:
        """When to ask again a verifier that has been free, with trees queued, since `since`."""
        raise NotImplementedError

    def timed(self, verifier: str) -> None:
        """A batch on this verifier was timed (`policy.costs` has the new sample)."""

    def shape(self, state: SessionState) -> tuple[int, int]:
        """(budget, depth) of the next tree of a session drafted by a user's or the shared pool's edge."""
        return self.policy.budget, self.policy.depth


class Fifo(BatchStrategy):
    name = "fifo"

    def batch(self, verifier: str, queue: deque[DraftTreeMsg], now: float) -> list[DraftTreeMsg]:
        return [queue.popleft() for _ in range(min(self.policy.max_batch, len(queue)))]

    def wake(self, verifier: str, since: float) -> float:
        return since + self.policy.tuning.cohort_wait_s


class TwoGroups(BatchStrategy):
    name = "two-groups"

    def __init__(self, policy: SchedulingPolicy) -> None:
        super().__init__(policy)
        self._turn: dict[str, int] = {}  # per verifier: the group whose turn it is

    def groups(self, verifier: str) -> int:
        return 2

    def batch(self, verifier: str, queue: deque[DraftTreeMsg], now: float) -> list[DraftTreeMsg]:
        """Strict alternation; a batch waits for its whole group (or `group_wait_s` after the
        verifier became free)."""
        p = self.policy
        turn = self._turn.get(verifier, 0)
        if not p.members(verifier, turn):  # an empty group passes its turn
            turn = 1 - turn
        members = p.members(verifier, turn)
        ready = sum(1 for s in members if s.in_flight)  # the verifier is free: in flight = queued
        if ready < min(len(members), p.max_batch) and now - p.free_since(verifier, now) < p.group_wait_s:
            return []
        batch = p.take(queue, turn)
        if batch:
            self._turn[verifier] = 1 - turn
            return batch
        return p.take(queue, 1 - turn)

    def wake(self, verifier: str, since: float) -> float:
        return since + self.policy.group_wait_s


class Pipeline(BatchStrategy):
    name = "pipeline"

    def __init__(self, policy: SchedulingPolicy) -> None:
        super().__init__(policy)
        self._count: dict[str, int] = {}  # per verifier: K

    def groups(self, verifier: str) -> int:
        return self._count.get(verifier, 2)

    def batch(self, verifier: str, queue: deque[DraftTreeMsg], now: float) -> list[DraftTreeMsg]:
        """The group with the oldest ready tree. It waits for the group's missing drafts due
        soon (`slack`), from the first ready tree."""
        p = self.policy
        oldest = p.sessions.get(queue[0].session_id)
        group = oldest.group if oldest is not None else 0
        slack = self.slack(verifier, group, queue)
        due = self._due(verifier, group, now)
        if due is not None and due - now <= slack and now - p.free_since(verifier, now) < slack:
            return []
        return p.take(queue, group)

    def wake(self, verifier: str, since: float) -> float:
        p = self.policy
        queue = p.queue(verifier)
        oldest = p.sessions.get(queue[0].session_id)
        return since + self.slack(verifier, oldest.group if oldest is not None else 0, queue)

    def slack(self, verifier: str, group: int, queue: deque[DraftTreeMsg]) -> float:
        """How long a group's batch may wait for its missing drafts. With other groups' trees
        ready, only while that is cheaper than verifying the late ones in a batch of their
        own: one verification divided by the group's size. With nothing else to do, up to
        `idle_wait_passes` of a verification: long enough to take in a draft due just after
        the others, short enough that the ready trees do not wait out a pass of their own (on
        this machine waiting up to two passes made a batch of four edges 1–9% slower per
        token for 10–20% less server time: `docs/benchmarks.md`). A later draft goes on in
        the next batch, so a slow edge never holds the others back."""
        p = self.policy
        others = any((s := p.sessions.get(t.session_id)) is not None and s.group != group for t in queue)
        if not others:
            return p.tuning.idle_wait_passes * p.verify_estimate(verifier)
        members = max(1, min(p.max_batch, len(p.members(verifier, group))))
        return p.verify_estimate(verifier) / members

    def _due(self, verifier: str, group: int, now: float) -> float | None:
        """When the next missing draft of this group is expected, if any is."""
        due = None
        for state in self.policy.members(verifier, group):
            if state.in_flight or state.edge is None or state.waiting_since is None:
                continue
            timing = self.policy.timings.get(state.edge)
            if timing is None or timing.turnaround_s is None:
                continue
            expected = max(now, state.waiting_since + timing.turnaround_s)  # overdue: any moment now
            due = expected if due is None else min(due, expected)
        return due

    def timed(self, verifier: str) -> None:
        """Pick K maximising sessions / cycle, where a cycle lasts the longer of K
        verifications of N/K sessions and one verification plus the edges' turnaround —
        one big batch when verification cost barely grows with batch size, more groups when
        it does. Sessions are re-dealt to groups when K changes."""
        p = self.policy
        worker, cost = p.verifiers.get(verifier), p.costs.get(verifier)
        if worker is None or cost is None or cost.samples < 4 or not worker.sessions:
            return
        turnarounds = [t.turnaround_s for e, t in p.timings.items()
                       if t.turnaround_s is not None and p.edges.get(e) and p.edges[e].sessions & worker.sessions]
        if not turnarounds:
            return
        turnaround, n = statistics.fmean(turnarounds), len(worker.sessions)

        def cycle(k: int) -> float:
            v = cost.seconds(math.ceil(n / k) * (p.budget + 1))
            return max(k * v, v + turnaround)

        least = max(1, math.ceil(n / p.max_batch))
        shortest = min(cycle(k) for k in range(least, least + 4))
        # The fewest groups whose cycle is within `group_tolerance` of the shortest: every pass
        # has a fixed cost, so more groups spend more server time per token; they must buy a
        # clearly shorter cycle (on a GPU, where a pass costs about the same for any batch,
        # this is always the fewest groups).
        best = min(k for k in range(least, least + 4) if cycle(k) <= (1 + p.tuning.group_tolerance) * shortest)
        if best != self._count.get(verifier, 2):
            self._count[verifier] = best
            for i, sid in enumerate(sorted(worker.sessions)):
                p.sessions[sid].group = i % best

    def shape(self, state: SessionState) -> tuple[int, int]:
        """The deepest tree that arrives in time, and no more nodes than keep the batch's node
        cost within `node_cost_share` of a verifier pass."""
        p = self.policy
        k, worker = self.groups(state.verifier), p.verifiers.get(state.verifier)
        batch = max(1, min(p.max_batch, len(worker.sessions) // k if worker else 1))
        cost = p.costs.get(state.verifier)
        timing = p.timings.get(state.edge) if state.edge is not None else None
        budget = p.budget
        if cost is not None and cost.samples >= 4 and cost.per_node_s > 0 and \
                self._saturated(k, cost.seconds(batch * (p.budget + 1)), timing):
            affordable = p.node_cost_share * cost.base_s / cost.per_node_s / batch - 1
            budget = max(p.min_budget, min(p.budget, int(affordable)))
        verify_s = cost.seconds(batch * (budget + 1)) if cost is not None else 0.05
        # With one group there is no other group's verification for a draft to be in time for:
        # the edge drafts its deepest tree (on a proactive hit that costs no waiting at all).
        depth = timing.best_depth(verify_s, (k - 1) * verify_s, p.depth) if timing is not None and k > 1 \
            else p.depth
        return budget, min(depth, budget) if budget else depth

    def _saturated(self, groups: int, verify_s: float, timing: EdgeTiming | None) -> bool:
        """Whether the verifier is under heavy load with full-size trees: busy for at least
        `saturated` of a cycle, which lasts the longer of all groups' verification and one
        verification plus this edge's turnaround (round trip and drafting). Only then do trees
        shrink: a verifier with time to spare gains nothing from smaller trees."""
        if timing is None or timing.turnaround_s is None:
            return groups > 1
        busy = groups * verify_s
        return busy >= self.policy.tuning.saturated * max(busy, verify_s + timing.turnaround_s)


STRATEGIES: dict[str, type[BatchStrategy]] = {s.name: s for s in (Fifo, TwoGroups, Pipeline)}
