"""What one edge may cost the scheduler: rate and size limits, offences, cut-off.

Pure and clock-free (callers pass `now`). Edges are untrusted user machines, so every
message from one is checked here *before* it is decoded: its size against
`max_draft_bytes`, its rate against a token bucket that refills with the sessions the
edge drafts for. Whatever is refused — too large, too fast, malformed, unsolicited (a
tree for a session that is not its own, a stale or duplicated cycle) — is an *offence*;
`offence_limit` of them within `window_s` cut the edge off for `suspend_s`. The service
acts on a cut-off: it unsubscribes from the edge's drafts (the NATS server then drops
them before they cost this process anything), ignores its announcements, records the
suspension in Redis for the other schedulers, and moves its sessions to other drafters.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GuardLimits:
    """The limits of one edge (`SchedulerSettings` carries the tunable ones)."""

    max_draft_bytes: int = 64 * 1024  # a 256-node tree with its assumptions is a few KiB
    drafts_per_s: float = 50.0  # bucket refill for an edge with no session
    drafts_per_s_per_session: float = 50.0  # and for each session it drafts for (trees ahead included)
    burst_s: float = 2.0  # the bucket holds this many seconds of its rate
    announcements_per_s: float = 4.0  # heartbeats, with room for a reconnect's burst
    offence_limit: int = 50  # offences within `window_s` that cut an edge off (`--edge-offence-limit`)
    window_s: float = 10.0
    suspend_s: float = 300.0  # `--edge-suspend`


class Verdict(enum.StrEnum):
    """What becomes of one message from an edge, decided before it is decoded."""

    ADMIT = "admit"
    OVERSIZED = "oversized"
    OVER_RATE = "over_rate"
    SUSPENDED = "suspended"  # cut off: dropped, not even counted


@dataclass
class _Bucket:
    tokens: float
    at: float

    def take(self, rate: float, capacity: float, now: float) -> bool:
        self.tokens = min(capacity, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class _EdgeRecord:
    drafts: _Bucket
    announcements: _Bucket
    offences: deque[float] = field(default_factory=deque)


class EdgeGuard:
    """Per-edge buckets and offence windows; `suspended_until` is the cut-off list."""

    def __init__(self, limits: GuardLimits | None = None) -> None:
        self.limits = limits or GuardLimits()
        self.suspended_until: dict[str, float] = {}
        self._edges: dict[str, _EdgeRecord] = {}

    def _record(self, edge: str, now: float) -> _EdgeRecord:
        if (record := self._edges.get(edge)) is None:
            lim = self.limits
            record = self._edges[edge] = _EdgeRecord(
                _Bucket(lim.drafts_per_s * lim.burst_s, now), _Bucket(lim.announcements_per_s * lim.burst_s, now))
        return record

    def suspended(self, edge: str, now: float) -> bool:
        until = self.suspended_until.get(edge)
        if until is None:
            return False
        if now < until:
            return True
        del self.suspended_until[edge]  # served its time: a clean slate
        self._edges.pop(edge, None)
        return False

    def draft(self, edge: str, size: int, sessions: int, now: float) -> Verdict:
        """A draft of `size` bytes from an edge drafting for `sessions` sessions."""
        if self.suspended(edge, now):
            return Verdict.SUSPENDED
        if size > self.limits.max_draft_bytes:
            return Verdict.OVERSIZED
        lim = self.limits
        rate = lim.drafts_per_s + lim.drafts_per_s_per_session * sessions
        if not self._record(edge, now).drafts.take(rate, rate * lim.burst_s, now):
            return Verdict.OVER_RATE
        return Verdict.ADMIT

    def announcement(self, edge: str, now: float) -> Verdict:
        if self.suspended(edge, now):
            return Verdict.SUSPENDED
        lim = self.limits
        if not self._record(edge, now).announcements.take(lim.announcements_per_s,
                                                         lim.announcements_per_s * lim.burst_s, now):
            return Verdict.OVER_RATE
        return Verdict.ADMIT

    def offence(self, edge: str, now: float) -> bool:
        """Count one offence; True when it is the one that cuts the edge off (then suspended)."""
        if self.suspended(edge, now):
            return False
        offences = self._record(edge, now).offences
        offences.append(now)
        while offences and offences[0] <= now - self.limits.window_s:
            offences.popleft()
        if len(offences) < self.limits.offence_limit:
            return False
        self.suspend(edge, now + self.limits.suspend_s)
        return True

    def suspend(self, edge: str, until: float) -> None:
        self.suspended_until[edge] = max(until, self.suspended_until.get(edge, until))
        self._edges.pop(edge, None)

    def forget(self, edge: str) -> None:
        """The edge left: drop its buckets (a suspension stands)."""
        self._edges.pop(edge, None)
