"""The scheduler's policy: who verifies and drafts each session, and what goes in a batch.

A pure, clock-injected class: it imports neither NATS nor Redis, takes `now` from its
caller and returns decisions as plain data, so the service wires it to the bus and a
simulator can drive it. This is the simple policy (least-loaded assignment, FIFO batches
per verifier); pipeline-aware scheduling builds on it.

Vocabulary: a *verifier* holds sessions' target caches; an *edge* drafts for sessions —
a user's own edge (private to that user), an edge of the *shared* pool, or a *server*
drafter run by the operator beside the verifiers (mode `server-only`); a session with no
edge takes *server steps* (empty trees: one autoregressive step each); a *batch* is the
trees one verifier checks in one pass. A session whose verifier is gone moves to another
verifier, which re-prefills it from its committed tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from specedge.protocol import DraftTreeMsg, Mode

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

    @property
    def free(self) -> int:
        return self.capacity - len(self.sessions)


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


@dataclass(frozen=True)
class Assignment:
    verifier: str
    edge: str | None  # None: drafted server-side


class NoCapacityError(RuntimeError):
    """No verifier can take another session."""


class SchedulingPolicy:
    """Least-loaded assignment and FIFO batching; silent edges and verifiers time out."""

    MAX_REFUSALS = 3  # a session whose trees (even server steps) keep being refused ends

    def __init__(self, max_batch: int = 8, edge_timeout_s: float = 6.0, verifier_timeout_s: float = 6.0,
                 draft_timeout_s: float = 5.0) -> None:
        self.max_batch, self.edge_timeout_s, self.verifier_timeout_s = max_batch, edge_timeout_s, verifier_timeout_s
        self.draft_timeout_s = draft_timeout_s
        self.verifiers: dict[str, Worker] = {}
        self.edges: dict[str, Worker] = {}
        self.sessions: dict[str, SessionState] = {}
        self._queues: dict[str, deque[DraftTreeMsg]] = {}

    # -- membership ---------------------------------------------------------------

    def verifier_seen(self, instance_id: str, capacity: int, now: float, fingerprint: str = "") -> None:
        worker = self.verifiers.setdefault(instance_id, Worker(instance_id, capacity, now))
        worker.capacity, worker.last_seen, worker.fingerprint = capacity, now, fingerprint
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
                    and now - state.waiting_since > self.draft_timeout_s):
                late.setdefault(state.edge, []).append(state.session_id)
                edge = self.edges.get(state.edge)
                if edge is not None:
                    edge.sessions.discard(state.session_id)
                state.edge, state.waiting_since = None, None
        return late

    # -- sessions -----------------------------------------------------------------

    def assign(self, session_id: str, committed_len: int, mode: Mode = "specedge", user: str = "") -> Assignment:
        """A verifier (most room) and a drafter for a new session.

        Mode `specedge`: the user's own edge, else the shared pool, else a server drafter,
        else server steps. `server-only`: a server drafter, else server steps.
        `autoregressive`: server steps. Never another user's edge.
        """
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already assigned")
        verifiers = [w for w in self.verifiers.values() if w.free > 0]
        if not verifiers:
            raise NoCapacityError("no verifier has room for another session")
        verifier = max(verifiers, key=lambda w: (w.free, w.instance_id))
        edge = self._drafter_for(mode, user, verifier.fingerprint)
        verifier.sessions.add(session_id)
        if edge is not None:
            edge.sessions.add(session_id)
        self.sessions[session_id] = SessionState(session_id, verifier.instance_id,
                                                 edge.instance_id if edge else None, user=user, mode=mode,
                                                 committed_len=committed_len)
        return Assignment(verifier.instance_id, edge.instance_id if edge else None)

    def _drafter_for(self, mode: Mode, user: str, fingerprint: str) -> Worker | None:
        pools = {"specedge": [("user", user), ("shared", ""), ("server", "")],
                 "server-only": [("server", "")], "autoregressive": []}[mode]
        for pool, owner in pools:
            if pool == "user" and not user:
                continue
            edges = [w for w in self.edges.values() if w.pool == pool and w.user == owner and w.free > 0
                     and w.fingerprint == fingerprint]
            if edges:
                return max(edges, key=lambda w: (w.free, w.instance_id))
        return None

    def draft_due(self, session_id: str, now: float) -> None:
        """The session's edge has been told to draft: its first tree is due from `now`."""
        if (state := self.sessions.get(session_id)) is not None:
            state.waiting_since = now

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

    def verified(self, session_id: str, new_tokens: int, now: float | None = None) -> None:
        """A result for the session's current cycle came back with `new_tokens` committed;
        its edge's next draft is due from `now` (None: no draft deadline)."""
        state = self.sessions.get(session_id)
        if state is None:
            return
        state.cycle += 1
        state.committed_len += new_tokens
        state.in_flight = False
        state.refusals = 0
        state.waiting_since = now

    def requeue(self, trees: list[DraftTreeMsg]) -> None:
        """A batch that failed (its verifier did not answer): its trees go back to the front
        of their sessions' verifiers' queues — which may be new verifiers by now."""
        for tree in reversed(trees):
            state = self.sessions.get(tree.session_id)
            if state is not None:
                self._queues[state.verifier].appendleft(tree)

    def refused(self, tree: DraftTreeMsg) -> bool:
        """The verifier refused this tree: replace it with a server step for the same cycle
        (the session moves on; its edge sees an empty accepted path). Returns False when the
        session keeps being refused and should end with an error."""
        state = self.sessions.get(tree.session_id)
        if state is None:
            return True
        state.refusals += 1
        if state.refusals >= self.MAX_REFUSALS:
            return False
        self._queues[state.verifier].append(DraftTreeMsg(session_id=state.session_id, cycle=state.cycle,
                                                         committed_len=state.committed_len, tokens=[], parents=[]))
        return True
