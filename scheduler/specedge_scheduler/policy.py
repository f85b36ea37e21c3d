"""The scheduler's policy: who verifies and drafts each session, and what goes in a batch.

A pure, clock-injected class: it imports neither NATS nor Redis, takes `now` from its
caller and returns decisions as plain data, so the service wires it to the bus and a
simulator can drive it. This is the simple policy (least-loaded assignment, FIFO batches
per verifier); pipeline-aware scheduling builds on it.

Vocabulary: a *verifier* holds sessions' target caches; an *edge* drafts for sessions; a
session with no edge is drafted *server-side* (here: empty trees, i.e. autoregressive
steps, until an edge takes it); a *batch* is the trees one verifier checks in one pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from specedge.protocol import DraftTreeMsg


@dataclass
class Worker:
    """A verifier or an edge as the policy sees it."""

    instance_id: str
    capacity: int
    last_seen: float
    fingerprint: str = ""  # tokenizer fingerprint: an edge drafts only for a verifier with the same
    sessions: set[str] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.capacity - len(self.sessions)


@dataclass
class SessionState:
    session_id: str
    verifier: str
    edge: str | None
    cycle: int = 0
    committed_len: int = 0
    in_flight: bool = False  # a tree of this session is queued or being verified


@dataclass(frozen=True)
class Assignment:
    verifier: str
    edge: str | None  # None: drafted server-side


class NoCapacityError(RuntimeError):
    """No verifier can take another session."""


class SchedulingPolicy:
    """Least-loaded assignment and FIFO batching; edges time out after `edge_timeout_s`."""

    def __init__(self, max_batch: int = 8, edge_timeout_s: float = 6.0) -> None:
        self.max_batch, self.edge_timeout_s = max_batch, edge_timeout_s
        self.verifiers: dict[str, Worker] = {}
        self.edges: dict[str, Worker] = {}
        self.sessions: dict[str, SessionState] = {}
        self._queues: dict[str, deque[DraftTreeMsg]] = {}

    # -- membership ---------------------------------------------------------------

    def verifier_seen(self, instance_id: str, capacity: int, now: float, fingerprint: str = "") -> None:
        worker = self.verifiers.setdefault(instance_id, Worker(instance_id, capacity, now))
        worker.capacity, worker.last_seen, worker.fingerprint = capacity, now, fingerprint
        self._queues.setdefault(instance_id, deque())

    def edge_seen(self, instance_id: str, capacity: int, now: float, fingerprint: str = "") -> bool:
        """Record an edge's heartbeat; False if its tokenizer matches no verifier's (it gets no work)."""
        worker = self.edges.setdefault(instance_id, Worker(instance_id, capacity, now))
        worker.capacity, worker.last_seen, worker.fingerprint = capacity, now, fingerprint
        return not self.verifiers or any(v.fingerprint == fingerprint for v in self.verifiers.values())

    def edge_gone(self, instance_id: str) -> list[str]:
        """Forget an edge; returns its sessions, now drafted server-side."""
        edge = self.edges.pop(instance_id, None)
        if edge is None:
            return []
        for session_id in edge.sessions:
            self.sessions[session_id].edge = None
        return sorted(edge.sessions)

    def expire_edges(self, now: float) -> dict[str, list[str]]:
        """Edges silent for longer than the timeout, with the sessions each leaves behind."""
        stale = [e for e, w in self.edges.items() if now - w.last_seen > self.edge_timeout_s]
        return {edge: self.edge_gone(edge) for edge in stale}

    # -- sessions -----------------------------------------------------------------

    def assign(self, session_id: str, committed_len: int, use_edge: bool = True) -> Assignment:
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already assigned")
        verifiers = [w for w in self.verifiers.values() if w.free > 0]
        if not verifiers:
            raise NoCapacityError("no verifier has room for another session")
        verifier = max(verifiers, key=lambda w: (w.free, w.instance_id))
        edges = [w for w in self.edges.values()
                 if use_edge and w.free > 0 and w.fingerprint == verifier.fingerprint]
        edge = max(edges, key=lambda w: (w.free, w.instance_id)) if edges else None
        verifier.sessions.add(session_id)
        if edge is not None:
            edge.sessions.add(session_id)
        self.sessions[session_id] = SessionState(session_id, verifier.instance_id,
                                                 edge.instance_id if edge else None, committed_len=committed_len)
        return Assignment(verifier.instance_id, edge.instance_id if edge else None)

    def finish(self, session_id: str) -> None:
        state = self.sessions.pop(session_id, None)
        if state is None:
            return
        for worker in (self.verifiers.get(state.verifier), self.edges.get(state.edge or "")):
            if worker is not None:
                worker.sessions.discard(session_id)

    # -- drafts and batches ------------------------------------------------------------

    def draft_arrived(self, tree: DraftTreeMsg, from_edge: str) -> str | None:
        """Queue a tree for its session's verifier, or return why it is refused."""
        state = self.sessions.get(tree.session_id)
        if state is None:
            return "unknown_session"
        if state.edge != from_edge:
            return "not_the_sessions_edge"
        if (tree.cycle, tree.committed_len) != (state.cycle, state.committed_len):
            return "stale_cycle"
        if state.in_flight:
            return "duplicate_draft"
        state.in_flight = True
        self._queues[state.verifier].append(tree)
        return None

    def server_side_trees(self) -> list[DraftTreeMsg]:
        """Queue an empty tree (one autoregressive step) for each edgeless session waiting."""
        queued = []
        for state in self.sessions.values():
            if state.edge is None and not state.in_flight:
                tree = DraftTreeMsg(session_id=state.session_id, cycle=state.cycle,
                                    committed_len=state.committed_len, tokens=[], parents=[])
                state.in_flight = True
                self._queues[state.verifier].append(tree)
                queued.append(tree)
        return queued

    def next_batch(self, verifier: str) -> list[DraftTreeMsg]:
        """Up to `max_batch` queued trees for this verifier, oldest first, one per session."""
        queue = self._queues.get(verifier, deque())
        return [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]

    def verified(self, session_id: str, new_tokens: int) -> None:
        """A result for the session's current cycle came back with `new_tokens` committed."""
        state = self.sessions.get(session_id)
        if state is None:
            return
        state.cycle += 1
        state.committed_len += new_tokens
        state.in_flight = False

    def requeue(self, trees: list[DraftTreeMsg]) -> None:
        """A batch that failed (verifier gone): its sessions may draft again."""
        for tree in trees:
            state = self.sessions.get(tree.session_id)
            if state is not None:
                state.in_flight = False
