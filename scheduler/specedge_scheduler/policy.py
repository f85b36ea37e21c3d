"""The scheduler's policy: who verifies and drafts each session, and what goes in a batch.

A pure, clock-injected class: it imports neither NATS nor Redis, takes `now` from its
caller and returns decisions as plain data, so the service wires it to the bus and a
simulator can drive it (through `core.SchedulerCore`). How a batch is chosen is the
strategy's (`strategies`: `fifo`, `two-groups`, `pipeline`).

Any strategy: a tree an edge sent ahead of its session's result (`DraftTreeMsg.assumed`)
is held and queued the moment the result shows its guess was right (`release_ahead`); an
edge may chain up to `MAX_TREES_AHEAD` of them, each guessing the result of the one
before, and a wrong guess drops the rest of the chain with it.

Vocabulary: a *verifier* holds sessions' target caches; an *edge* drafts for sessions —
a user's own edge (private to that user), an edge of the *shared* pool, or a *server*
drafter run by the operator beside the verifiers (mode `server-only`); a session with no
edge takes *server steps* (empty trees: one autoregressive step each); a *batch* is the
trees one verifier checks in one pass. A session whose verifier is gone moves to another
verifier, which re-prefills it from its committed tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from specedge.protocol import MAX_TREES_AHEAD, TREE_BUDGET, TREE_DEPTH, DraftTreeMsg, Mode, Reason
from specedge_scheduler.strategies import STRATEGIES, BatchStrategy, Strategy
from specedge_scheduler.timing import EdgeTiming, VerificationCost

EdgePool = str  # "user" (private to `Worker.user`), "shared" or "server"


@dataclass
class Worker:
    """A verifier or an edge as the policy sees it."""

    instance_id: str
    capacity: int
    last_seen: float
    fingerprint: str = ""  # tokenizer fingerprint: an edge drafts only for a verifier with the same
    user: str = ""  # an edge's owner; "" for the shared pool and server drafters
    pool: EdgePool = "shared"
    sessions: set[str] = field(default_factory=set)
    free_tokens: int | None = None  # a paged verifier's free KV capacity (announced, less what was placed since)

    @property
    def free(self) -> int:
        return self.capacity - len(self.sessions)

    def fits(self, tokens: int) -> bool:
        """Room for one more session of `tokens` (and its trees)."""
        return self.free > 0 and (self.free_tokens is None or self.free_tokens >= tokens + SESSION_HEADROOM)


@dataclass
class SessionState:
    session_id: str
    verifier: str
    edge: str | None
    user: str = ""
    mode: Mode = "specedge"
    cycle: int = 0
    committed_len: int = 0
    in_flight: bool = False  # a tree of this session is queued or being verified
    refusals: int = 0  # trees refused by the verifier in a row
    waiting_since: float | None = None  # when its edge was last due to send a draft
    group: int = 0  # its phase, for the grouped strategies
    budget: int = 0  # the tree shape its edge was last asked for (0: the edge's default)
    depth: int = 0
    # trees sent ahead of this cycle's result, by cycle (a chain: each guesses the one before)
    ahead: dict[int, DraftTreeMsg] = field(default_factory=dict)
    last_committed: tuple[int, ...] = ()  # what the last verified cycle committed (accepted + bonus)
    left: set[str] = field(default_factory=set)  # edges it was taken from: never given back to them


@dataclass(frozen=True)
class Move:
    """A session changes drafter at a cycle boundary (`SchedulingPolicy.rehome`)."""

    session_id: str
    from_edge: str | None  # None: it took server steps
    to_edge: str | None  # None: it takes server steps
    cause: str  # "useless_drafter" (its edge's trees are not accepted) or "drafter_free" (one has room now)


@dataclass(frozen=True)
class Assignment:
    verifier: str
    edge: str | None  # None: drafted server-side


SESSION_HEADROOM = 64  # tokens a new session needs beyond its prompt: its first trees and replies


class NoCapacityError(RuntimeError):
    """No verifier can take another session."""


@dataclass(frozen=True)
class Tuning:
    """The scheduler's constants: the one place they are set (the policy's, its strategies'
    and the core's)."""

    max_refusals: int = 3  # a session whose trees (even server steps) keep being refused ends
    judge_after: int = 8  # an edge's trees verified before its acceptance decides anything
    useless_below: float = 0.25  # accepted tokens per tree below which an edge's trees do not pay for their nodes
    deadline_margin: float = 4.0  # an edge with measured turnarounds has this × its recent peak to draft,
    min_draft_deadline_s: float = 1.0  # but at least this, and at most `draft_timeout_s`
    cohort_wait_s: float = 0.05  # a server-side drafter's batch waits this long for the rest of its sessions
    idle_wait_passes: float = 0.5  # pipeline: an idle verifier waits this share of a pass for late drafts
    group_tolerance: float = 0.3  # pipeline: more groups only for a cycle shorter by more than this
    saturated: float = 0.9  # pipeline: predicted busy share of the verifier from which trees shrink
    housekeeping_s: float = 0.1  # core: how often silent edges, verifiers and late drafts are looked for
    orphan_max_idle_s: float = 90.0  # core: an orphaned session without a commit for longer is deleted
    state_retry_s: float = 0.5  # core: wait between tries of a session whose Redis was unreachable
    ended_memory_s: float = 60.0  # core: how long a late draft for an ended session is forgiven
    failed_batch_rest_s: float = 0.5  # core: a verifier whose batch failed gets none for this long


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's tuning: the one source of these defaults (`SchedulerSettings` and the
    scheduler's command line take them from here)."""

    max_batch: int = 8  # trees verified in one pass at most
    edge_timeout_s: float = 6.0  # silence before an edge's sessions continue server-side
    verifier_timeout_s: float = 6.0  # silence before a verifier's sessions move to another
    draft_timeout_s: float = 5.0  # most time an edge has for a session's next draft
    strategy: Strategy = "pipeline"
    budget: int = TREE_BUDGET  # tree nodes edges are asked for
    depth: int = TREE_DEPTH  # tree levels edges are asked for
    min_budget: int = 4  # trees never shrink below this
    node_cost_share: float = 1.0  # pipeline: a batch's node cost within this share of a verifier pass
    group_wait_s: float = 0.5  # two-groups: most wait for a group's late draft
    server_budget: int = 0  # trees of server-side drafters (0: `budget`; the paper's server-only baseline: 64)
    server_depth: int = 0  # (0: `depth`)
    tuning: Tuning = Tuning()


class SchedulingPolicy:
    """Least-loaded assignment and batching by strategy; silent edges and verifiers time out."""

    def __init__(self, config: PolicyConfig | None = None, **overrides: Any) -> None:
        """`config` (default: `PolicyConfig()`) with `overrides` of its fields."""
        self.config = c = replace(config or PolicyConfig(), **overrides)
        if c.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {c.strategy!r}; one of {', '.join(STRATEGIES)}")
        self.max_batch, self.edge_timeout_s = c.max_batch, c.edge_timeout_s
        self.verifier_timeout_s = c.verifier_timeout_s
        self.draft_timeout_s, self.tuning = c.draft_timeout_s, c.tuning
        self.strategy: BatchStrategy = STRATEGIES[c.strategy](self)
        self.budget, self.depth, self.min_budget = c.budget, c.depth, c.min_budget
        self.server_budget = c.server_budget or c.budget  # trees of server-side drafters (the paper's baseline: 64)
        self.server_depth = c.server_depth or c.depth
        self.node_cost_share, self.group_wait_s = c.node_cost_share, c.group_wait_s
        self.costs: dict[str, VerificationCost] = {}  # per verifier
        self.timings: dict[str, EdgeTiming] = {}  # per edge
        self._free_since: dict[str, float] = {}  # per verifier: idle, with trees queued, since
        self._edgeless: set[str] = set()  # sessions taking server steps
        self.verifiers: dict[str, Worker] = {}
        self.edges: dict[str, Worker] = {}
        self.sessions: dict[str, SessionState] = {}
        self._queues: dict[str, deque[DraftTreeMsg]] = {}

    # -- membership ---------------------------------------------------------------

    def verifier_seen(self, instance_id: str, capacity: int, now: float, fingerprint: str = "",
                      free_tokens: int | None = None) -> None:
        """A verifier's announcement: sessions it may hold, and (paged) the KV tokens it has free."""
        worker = self.verifiers.setdefault(instance_id, Worker(instance_id, capacity, now))
        worker.capacity, worker.last_seen, worker.fingerprint = capacity, now, fingerprint
        worker.free_tokens = free_tokens
        self._queues.setdefault(instance_id, deque())

    def edge_seen(self, instance_id: str, capacity: int, now: float, fingerprint: str = "", user: str = "",
                  pool: EdgePool = "shared") -> bool:
        """Record an edge's heartbeat; False if its tokenizer matches no verifier's (it gets no work)."""
        if pool not in ("user", "shared", "server") or (pool == "user") != bool(user):
            raise ValueError(f"edge pool {pool!r} with user {user!r}: a user edge names its user, no other does")
        worker = self.edges.setdefault(instance_id, Worker(instance_id, capacity, now))
        worker.capacity, worker.last_seen, worker.fingerprint = capacity, now, fingerprint
        worker.user, worker.pool = user, pool
        return not self.verifiers or any(v.fingerprint == fingerprint for v in self.verifiers.values())

    def verifier_gone(self, instance_id: str) -> list[str]:
        """Forget a verifier; its sessions move to the others (re-prefilled there from committed
        tokens), or, with no room anywhere, are returned as lost. Returns the lost sessions."""
        worker = self.verifiers.pop(instance_id, None)
        queue = self._queues.pop(instance_id, deque())
        if worker is None:
            return []
        lost = []
        for session_id in sorted(worker.sessions):
            state = self.sessions[session_id]
            others = [w for w in self.verifiers.values() if w.free > 0 and w.fingerprint == worker.fingerprint]
            if not others:
                lost.append(session_id)
                continue
            target = max(others, key=lambda w: (w.free, w.instance_id))
            target.sessions.add(session_id)
            state.verifier = target.instance_id
        for tree in queue:  # queued trees follow their sessions
            state = self.sessions.get(tree.session_id)
            if state is not None and state.session_id not in lost:
                self._queues[state.verifier].append(tree)
        return lost

    def seen_all(self, now: float) -> None:
        """Count every known verifier and edge as just heard from: after the bus itself was
        down, silence says nothing about them (their heartbeats could not arrive)."""
        for worker in (*self.verifiers.values(), *self.edges.values()):
            worker.last_seen = max(worker.last_seen, now)

    def expire_verifiers(self, now: float) -> dict[str, list[str]]:
        """Verifiers silent for longer than the timeout, with the sessions each loses."""
        stale = [v for v, w in self.verifiers.items() if now - w.last_seen > self.verifier_timeout_s]
        return {verifier: self.verifier_gone(verifier) for verifier in stale}

    def edge_gone(self, instance_id: str) -> list[str]:
        """Forget an edge; returns its sessions, now drafted server-side."""
        edge = self.edges.pop(instance_id, None)
        if edge is None:
            return []
        for session_id in edge.sessions:
            self.sessions[session_id].edge = None
            self.sessions[session_id].ahead.clear()
            self.sessions[session_id].left.add(instance_id)
            self._edgeless.add(session_id)
        return sorted(edge.sessions)

    def expire_edges(self, now: float) -> dict[str, list[str]]:
        """Edges silent for longer than the timeout, with the sessions each leaves behind."""
        stale = [e for e, w in self.edges.items() if now - w.last_seen > self.edge_timeout_s]
        return {edge: self.edge_gone(edge) for edge in stale}

    def expire_drafts(self, now: float) -> dict[str, list[str]]:
        """Sessions whose edge missed its draft deadline (stalled, overloaded, or it could not
        open the session) continue with server steps. Returns {edge: sessions taken from it}."""
        late: dict[str, list[str]] = {}
        for state in self.sessions.values():
            if (state.edge is not None and not state.in_flight and state.waiting_since is not None
                    and now - state.waiting_since > self.draft_deadline_s(state)):
                late.setdefault(state.edge, []).append(state.session_id)
                edge = self.edges.get(state.edge)
                if edge is not None:
                    edge.sessions.discard(state.session_id)
                state.left.add(state.edge)
                state.edge, state.waiting_since = None, None
                state.ahead.clear()
                self._edgeless.add(state.session_id)
        return late

    def draft_deadline_s(self, state: SessionState) -> float:
        """How long the session's edge has for its next draft: `draft_timeout_s` for a first
        tree (the edge prefills the prompt first) or an edge not measured yet; else
        `deadline_margin` × its recent peak turnaround within [`min_draft_deadline_s`,
        `draft_timeout_s`] — so a dead edge's sessions go on within about a second."""
        timing = self.timings.get(state.edge or "")
        if state.cycle == 0 or timing is None or timing.peak_s is None:
            return self.draft_timeout_s
        t = self.tuning
        return min(self.draft_timeout_s, max(t.min_draft_deadline_s, t.deadline_margin * timing.peak_s))

    # -- sessions -----------------------------------------------------------------

    def assign(self, session_id: str, committed_len: int, mode: Mode = "specedge", user: str = "",
               prefer: str | None = None, cycle: int = 0) -> Assignment:
        """A verifier (most room) and a drafter for a new session.

        Mode `specedge`: the user's own edge, else the shared pool, else a server drafter,
        else server steps. `server-only`: a server drafter, else server steps.
        `autoregressive`: server steps. Never another user's edge. A session taken over from
        a scheduler that died keeps its verifier (`prefer`, which holds its cache) if that
        one is known, and goes on from its committed `cycle`.
        """
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already assigned")
        verifiers = [w for w in self.verifiers.values() if w.fits(committed_len)]
        if prefer in self.verifiers:
            verifier = self.verifiers[prefer]
        elif not verifiers:
            raise NoCapacityError("no verifier has room for another session")
        else:  # the most free KV tokens (paged verifiers), else the most free sessions
            verifier = max(verifiers, key=lambda w: (w.free_tokens or 0, w.free, w.instance_id))
        if verifier.free_tokens is not None:  # until its next announcement says better
            verifier.free_tokens = max(0, verifier.free_tokens - committed_len - SESSION_HEADROOM)
        edge = self._drafter_for(mode, user, verifier.fingerprint)
        verifier.sessions.add(session_id)
        if edge is not None:
            edge.sessions.add(session_id)
        # In flight until `draft_due`: no tree (server step or draft) before its verifier has prefilled it.
        state = SessionState(session_id, verifier.instance_id, edge.instance_id if edge else None, user=user,
                             mode=mode, cycle=cycle, committed_len=committed_len, budget=self.budget,
                             depth=self.depth, in_flight=True)
        state.group = self._emptiest_group(verifier)
        self.sessions[session_id] = state
        if edge is None:
            self._edgeless.add(session_id)
        return Assignment(verifier.instance_id, edge.instance_id if edge else None)

    def groups(self, verifier: str) -> int:
        """How many phase groups a verifier's sessions form (the strategy's)."""
        return self.strategy.groups(verifier)

    def _emptiest_group(self, verifier: Worker) -> int:
        k = self.groups(verifier.instance_id)
        sizes = [0] * k
        for sid in verifier.sessions:
            state = self.sessions.get(sid)
            if state is not None and state.group < k:
                sizes[state.group] += 1
        return sizes.index(min(sizes))

    def _drafter_for(self, mode: Mode, user: str, fingerprint: str,
                     exclude: set[str] | frozenset[str] = frozenset()) -> Worker | None:
        pools = {"specedge": [("user", user), ("shared", ""), ("server", "")],
                 "server-only": [("server", "")], "autoregressive": []}[mode]
        for pool, owner in pools:
            if pool == "user" and not user:
                continue
            edges = [w for w in self.edges.values() if w.pool == pool and w.user == owner and w.free > 0
                     and w.fingerprint == fingerprint and w.instance_id not in exclude
                     and self.helps(w.instance_id)]
            if edges:
                return max(edges, key=lambda w: (w.free, w.instance_id))
        return None

    def helps(self, edge: str) -> bool:
        """Whether an edge's trees pay for themselves: unjudged (fewer than `judge_after`
        trees verified), or at least `useless_below` accepted tokens per tree. A drafter that
        does not help — hostile, or a draft model that does not fit the target — gets no new
        sessions, and its sessions move away (`rehome`)."""
        timing = self.timings.get(edge)
        return timing is None or timing.verifications < self.tuning.judge_after or \
            timing.accepted_per_tree >= self.tuning.useless_below

    def rehome(self, session_id: str) -> Move | None:
        """At a cycle boundary (its result just came, no tree out or sent ahead): take the
        session from an edge that does not help, and give a session without an edge one that
        has room (never one it left). The session is in flight until `draft_due` once it has
        a new edge. None: it stays as it is."""
        state = self.sessions.get(session_id)
        if state is None or state.in_flight or state.ahead:
            return None
        old, cause = state.edge, "drafter_free"
        if old is not None:
            if self.helps(old):
                return None
            if (edge := self.edges.get(old)) is not None:
                edge.sessions.discard(session_id)
            state.left.add(old)
            state.edge, state.waiting_since, cause = None, None, "useless_drafter"
            self._edgeless.add(session_id)
        elif session_id not in self._edgeless:
            return None
        verifier = self.verifiers.get(state.verifier)
        new = self._drafter_for(state.mode, state.user, verifier.fingerprint if verifier else "", state.left)
        if new is None:
            return Move(session_id, old, None, cause) if old is not None else None
        new.sessions.add(session_id)
        state.edge, state.in_flight, state.waiting_since = new.instance_id, True, None
        self._edgeless.discard(session_id)
        return Move(session_id, old, new.instance_id, cause)

    def unhome(self, session_id: str) -> None:
        """A move to a new edge could not be carried out: server steps, as before."""
        state = self.sessions.get(session_id)
        if state is None or state.edge is None:
            return
        if (edge := self.edges.get(state.edge)) is not None:
            edge.sessions.discard(session_id)
        state.left.add(state.edge)
        state.edge, state.in_flight, state.waiting_since = None, False, None
        self._edgeless.add(session_id)

    def draft_due(self, session_id: str, now: float) -> None:
        """The session is prefilled and its edge (if any) told to draft: trees may come,
        the first one due from `now`."""
        if (state := self.sessions.get(session_id)) is not None:
            state.waiting_since, state.in_flight = now, False

    def finish(self, session_id: str) -> None:
        state = self.sessions.pop(session_id, None)
        self._edgeless.discard(session_id)
        if state is None:
            return
        queue = self._queues.get(state.verifier)
        if queue and any(t.session_id == session_id for t in queue):  # e.g. a tree sent ahead, released
            self._queues[state.verifier] = deque(t for t in queue if t.session_id != session_id)
        for worker in (self.verifiers.get(state.verifier), self.edges.get(state.edge or "")):
            if worker is not None:
                worker.sessions.discard(session_id)

    # -- drafts and batches ------------------------------------------------------------

    def draft_arrived(self, tree: DraftTreeMsg, from_edge: str, now: float | None = None,
                      draft_s: float = 0.0) -> str | None:
        """Queue a tree for its session's verifier, or return why it is refused.

        With `now`, the session's turnaround (result sent → this draft) and the edge's own
        drafting time `draft_s` feed the edge's timing."""
        state = self.sessions.get(tree.session_id)
        if state is None:
            return Reason.AHEAD_UNUSED if tree.assumed else "unknown_session"  # sent ahead; the session ended
        if state.edge != from_edge:
            return Reason.NOT_THE_SESSIONS_EDGE
        if tree.assumed:
            if (reason := self._ahead_arrived(state, tree)) is not None or state.ahead.get(tree.cycle) is tree:
                return reason
        if (tree.cycle, tree.committed_len) != (state.cycle, state.committed_len):
            return Reason.STALE_CYCLE
        if state.in_flight:
            return Reason.DUPLICATE_DRAFT
        state.in_flight = True
        if now is not None and state.waiting_since is not None and not tree.assumed:
            # (a tree sent ahead was on its way before the result left: it times no turnaround)
            timing = self.timings.setdefault(from_edge, EdgeTiming())
            timing.add(now - state.waiting_since, draft_s, state.depth or self.depth)
        self._queues[state.verifier].append(tree)
        return None

    def _ahead_arrived(self, state: SessionState, tree: DraftTreeMsg) -> str | None:
        """A tree drafted from a guess of the outcome of the cycle before it (`tree.assumed`):
        held while that cycle is in flight or itself held (a chain of at most
        `MAX_TREES_AHEAD`, one tree per cycle), or — its result already out — treated as an
        ordinary tree if the guess was right. Returns why it is refused (`ahead_unused`: a
        wrong guess, or its session ended — no offence)."""
        step = tree.cycle - state.cycle
        if 1 <= step <= MAX_TREES_AHEAD:
            if step == 1:
                if not state.in_flight:  # this cycle's own tree has not come: it built on a
                    return Reason.AHEAD_UNUSED  # wrong guess (the edge learns of it on its way)
                base = state.committed_len
            elif (before := state.ahead.get(tree.cycle - 1)) is None:
                return Reason.AHEAD_UNUSED  # the tree it builds on was a wrong guess, dropped
            else:
                base = before.committed_len
            if tree.committed_len != base + len(tree.assumed):
                return Reason.STALE_CYCLE
            if tree.cycle in state.ahead:
                return Reason.DUPLICATE_DRAFT
            state.ahead[tree.cycle] = tree
            return None
        if tree.cycle == state.cycle and (tree.committed_len, tuple(tree.assumed)) != \
                (state.committed_len, state.last_committed):
            return Reason.AHEAD_UNUSED  # it came after the result, which its guess did not match
        return None

    def release_ahead(self, session_id: str) -> DraftTreeMsg | None:
        """After `verified`: queue the tree sent ahead for the new cycle if its guess came
        true (the edge then sends nothing more for this cycle) and return it; a wrong guess
        is dropped with every tree built on it (the edge drafts afresh when the result
        reaches it)."""
        state = self.sessions.get(session_id)
        if state is None or not state.ahead:
            return None
        tree = state.ahead.pop(state.cycle, None)
        if tree is None or state.in_flight or tree.committed_len != state.committed_len \
                or tuple(tree.assumed) != state.last_committed:
            state.ahead.clear()
            return None
        state.in_flight, state.waiting_since = True, None
        self._queues[state.verifier].append(tree)
        return tree

    def server_side_trees(self) -> list[DraftTreeMsg]:
        """Queue an empty tree (one autoregressive step) for each edgeless session waiting."""
        queued = []
        for session_id in self._edgeless:
            state = self.sessions[session_id]
            if not state.in_flight:
                tree = DraftTreeMsg(session_id=state.session_id, cycle=state.cycle,
                                    committed_len=state.committed_len, tokens=[], parents=[])
                state.in_flight = True
                self._queues[state.verifier].append(tree)
                queued.append(tree)
        return queued

    def next_batch(self, verifier: str, now: float = 0.0) -> list[DraftTreeMsg]:
        """The trees this verifier should verify now, by the strategy; [] means wait (see
        `next_wake`). At most `max_batch`, one per session, none held back for ever."""
        queue = self._queues.get(verifier, deque())
        if not queue:
            return []
        if self._cohort_incomplete(verifier, queue, now):
            return []
        if (cohort := self._cohort_of(queue[0])) is not None:  # a server-side drafter's: lockstep, any strategy
            batch = self.take(queue, None, cohort)
        else:
            batch = self.strategy.batch(verifier, queue, now)
        if batch:
            self._free_since.pop(verifier, None)
        return batch

    def _cohort_incomplete(self, verifier: str, queue: deque[DraftTreeMsg], now: float) -> bool:
        """A server-side drafter drafts its sessions together right after their results: verify
        them together too (lockstep, as a server running both models would), waiting up to
        `cohort_wait_s` for the rest of its sessions on this verifier."""
        drafter = self._cohort_of(queue[0])
        if drafter is None:
            return False
        missing = any(not self.sessions[s].in_flight and self.sessions[s].verifier == verifier
                      for s in drafter.sessions if s in self.sessions)
        if not missing:
            return False
        return now - self.free_since(verifier, now) < self.tuning.cohort_wait_s

    def free_since(self, verifier: str, now: float) -> float:
        """Since when the verifier has been free with trees queued (from `now` if it just became so)."""
        return self._free_since.setdefault(verifier, now)

    def queue(self, verifier: str) -> deque[DraftTreeMsg]:
        """The verifier's queued trees, oldest first."""
        return self._queues.get(verifier, deque())

    def _cohort_of(self, tree: DraftTreeMsg) -> Worker | None:
        """The server-side drafter that drafted this tree's session, if one did."""
        state = self.sessions.get(tree.session_id)
        drafter = self.edges.get(state.edge) if state is not None and state.edge is not None else None
        return drafter if drafter is not None and drafter.pool == "server" else None

    def take(self, queue: deque[DraftTreeMsg], group: int | None,
              drafter: Worker | None = None) -> list[DraftTreeMsg]:
        """Remove and return up to `max_batch` queued trees of one group (None: any) — or of one
        server-side drafter's sessions — oldest first."""
        taken, kept = [], deque()
        while queue:
            tree = queue.popleft()
            state = self.sessions.get(tree.session_id)
            mine = (group is None or state is None or state.group == group) if drafter is None \
                else tree.session_id in drafter.sessions
            if len(taken) < self.max_batch and mine:
                taken.append(tree)
            else:
                kept.append(tree)
        queue.extend(kept)
        return taken

    def members(self, verifier: str, group: int) -> list[SessionState]:
        worker = self.verifiers.get(verifier)
        states = (self.sessions.get(s) for s in (worker.sessions if worker else ()))
        return [s for s in states if s is not None and s.group == group]

    @property
    def queued(self) -> int:
        """Trees waiting for a verifier, over all verifiers."""
        return sum(len(q) for q in self._queues.values())

    def next_wake(self, verifier: str, now: float) -> float | None:
        """When a waiting strategy should be asked again (None: on the next event only)."""
        since = self._free_since.get(verifier)
        if since is None or not self._queues.get(verifier):
            return None
        return self.strategy.wake(verifier, since)

    def verify_estimate(self, verifier: str) -> float:
        cost, worker = self.costs.get(verifier), self.verifiers.get(verifier)
        if cost is None or worker is None:
            return 0.05
        batch = min(self.max_batch, max(1, len(worker.sessions) // self.groups(verifier)))
        return cost.seconds(batch * (self.budget + 1))

    # -- timing and tree shapes ---------------------------------------------------------

    def verify_timed(self, verifier: str, nodes: int, seconds: float) -> None:
        """A batch of `nodes` tree nodes (roots included) took `seconds` on this verifier."""
        self.costs.setdefault(verifier, VerificationCost()).add(nodes, seconds)
        self.strategy.timed(verifier)

    def shape_for(self, session_id: str) -> tuple[int, int]:
        """(budget, depth) for the session's next tree (`_shape_for`), no larger than its
        edge's acceptance pays for: an edge judged to accept fewer than one token per tree
        gets trees shrunk in proportion (never below `min_budget`)."""
        budget, depth = self._shape_for(session_id)
        state = self.sessions.get(session_id)
        timing = self.timings.get(state.edge) if state is not None and state.edge is not None else None
        if timing is not None and timing.verifications >= self.tuning.judge_after and timing.accepted_per_tree < 1 \
                and budget > self.min_budget:
            budget = max(self.min_budget, int(budget * timing.accepted_per_tree))
            depth = min(depth, budget)
            state.budget, state.depth = budget, depth
        return budget, depth

    def _shape_for(self, session_id: str) -> tuple[int, int]:
        """(budget, depth): a server-side drafter's fixed shape, else the strategy's."""
        state = self.sessions.get(session_id)
        if state is None or state.edge is None:
            return self.budget, self.depth
        drafter = self.edges.get(state.edge)
        if drafter is not None and drafter.pool == "server":
            return self.server_budget, self.server_depth
        state.budget, state.depth = self.strategy.shape(state)
        return state.budget, state.depth

    def verified(self, session_id: str, new_tokens: int | Sequence[int], now: float | None = None) -> None:
        """A result for the session's current cycle came back committing `new_tokens` (the
        tokens, or only their count); its edge's next draft is due from `now` (None: no draft
        deadline) — unless a tree sent ahead is released (`release_ahead`)."""
        state = self.sessions.get(session_id)
        if state is None:
            return
        if not isinstance(new_tokens, int):
            state.last_committed, new_tokens = tuple(new_tokens), len(new_tokens)
        else:
            state.last_committed = ()
        state.cycle += 1
        state.committed_len += new_tokens
        state.in_flight = False
        state.refusals = 0
        state.waiting_since = now
        if state.edge is not None and (timing := self.timings.get(state.edge)) is not None:
            timing.verified(state.depth or self.depth, new_tokens)

    def requeue(self, trees: list[DraftTreeMsg]) -> None:
        """A batch that failed (its verifier did not answer): its trees go back to the front
        of their sessions' verifiers' queues — which may be new verifiers by now."""
        for tree in reversed(trees):
            state = self.sessions.get(tree.session_id)
            if state is not None:
                self._queues[state.verifier].appendleft(tree)

    def refused(self, tree: DraftTreeMsg, count: bool = True) -> bool:
        """The verifier refused this tree: replace it with a server step for the same cycle
        (the session moves on; its edge sees an empty accepted path). Returns False when the
        session keeps being refused and should end with an error. `count=False`: a refusal
        that says nothing about the session (its state store was unreachable) is retried
        without counting towards that end."""
        state = self.sessions.get(tree.session_id)
        if state is None:
            return True
        state.refusals += 1 if count else 0
        if state.refusals >= self.tuning.max_refusals:
            return False
        self._queues[state.verifier].append(DraftTreeMsg(session_id=state.session_id, cycle=state.cycle,
                                                         committed_len=state.committed_len, tokens=[], parents=[]))
        return True
