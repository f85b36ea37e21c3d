"""The scheduler core's vocabulary: the events it is handed and the commands it returns.

Events say what happened: a message arrived (as the bytes that crossed the bus, where an
edge sent it), or a command that waits for an outcome has one (`Prefilled` after
`CreateSession`, `BatchVerified` after `Verify`, …), or time passed (`Tick`). Commands say
what to do: publish a message, read or write Redis, send a batch to a verifier, subscribe
to an edge's drafts, or record a session's spans. Plain frozen dataclasses: the service
(`service.py`) and the simulator carry them out each in their own way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from specedge.protocol import DraftTreeMsg, ServiceAnnouncement, SessionOpen, VerifyBatchReply
from specedge.state import SessionRecord
from specedge_scheduler.policy import Move

# -- events: what happened -------------------------------------------------------------


@dataclass(frozen=True)
class Announced:
    """An announcement as it arrived on `registry.announce.…` (believed only on its own subject)."""

    subject: str
    data: bytes


@dataclass(frozen=True)
class Discovered:
    """An announcement `registry.discover` has already checked against its subject."""

    announcement: ServiceAnnouncement


@dataclass(frozen=True)
class Left:
    data: bytes


@dataclass(frozen=True)
class DraftReceived:
    """A draft on `drafts.<edge>.<this scheduler>`: the subject names the edge (NATS permissions bind it)."""

    subject: str
    data: bytes


@dataclass(frozen=True)
class OpenRequested:
    data: bytes
    reply: str
    trace_parent: Any = None  # the opener's trace context (opaque here: handed to `TraceSession`)
    retried: bool = False  # asked again after `Rediscover`


@dataclass(frozen=True)
class CloseRequested:
    data: bytes


@dataclass(frozen=True)
class StatsRequested:
    reply: str


@dataclass(frozen=True)
class Prefilled:
    """The outcome of `CreateSession`."""

    session_id: str
    error: str | None


@dataclass(frozen=True)
class BatchVerified:
    """The outcome of `Verify`: the verifier's reply, or None when the request failed."""

    verifier: str
    trees: tuple[DraftTreeMsg, ...]
    reply: VerifyBatchReply | None
    error: str = ""


@dataclass(frozen=True)
class RecordLoaded:
    """The outcome of `LoadRecord` (None: no record, or Redis unreachable)."""

    session_id: str
    purpose: Literal["catch_up", "move"]
    record: SessionRecord | None
    tree: DraftTreeMsg | None = None
    move: Move | None = None


@dataclass(frozen=True)
class Listening:
    """The outcome of `Listen`: subscribed to the edge's drafts, or (`suspended_s` > 0) not,
    because Redis says another scheduler cut it off for that much longer."""

    edge: str
    announcement: ServiceAnnouncement
    suspended_s: float = 0.0


@dataclass(frozen=True)
class OrphanClaimed:
    """A session of a dead scheduler, now claimed in Redis by this one (or claimed at an
    earlier scan and not adopted yet)."""

    record: SessionRecord
    dead: str


@dataclass(frozen=True)
class OrphanGone:
    """A session claimed earlier whose record is gone."""

    session_id: str


@dataclass(frozen=True)
class ScanDone:
    pass


@dataclass(frozen=True)
class Recorded:
    """The outcome of `RecordAssignment(confirm=True)`."""

    session_id: str
    ok: bool


@dataclass(frozen=True)
class Tick:
    """Time passed: dispatch what is ready, and every `housekeeping_s` expire the silent."""


Event = (Announced | Discovered | Left | DraftReceived | OpenRequested | CloseRequested | StatsRequested
         | Prefilled | BatchVerified | RecordLoaded | Listening | OrphanClaimed | OrphanGone | ScanDone
         | Recorded | Tick)


# -- commands: what to do ----------------------------------------------------------------

TraceOf = Literal["session", "cycle", "delivery"]


@dataclass(frozen=True)
class Publish:
    """Send `message` on `subject` (a reply subject too), with the trace context of the
    session's `trace` (its own span, current cycle or current delivery), if any."""

    subject: str
    message: msgspec.Struct
    session_id: str = ""
    trace: TraceOf | None = None


@dataclass(frozen=True)
class Listen:
    """Subscribe to an edge's drafts to us unless Redis records it cut off → `Listening`."""

    edge: str
    announcement: ServiceAnnouncement


@dataclass(frozen=True)
class StopListening:
    edge: str


@dataclass(frozen=True)
class SuspendEdge:
    """Record in Redis that the edge is cut off, for every scheduler."""

    edge: str
    seconds: float


@dataclass(frozen=True)
class CreateSession:
    """Record the session in Redis and prefill it on its verifier → `Prefilled`."""

    request: SessionOpen
    verifier: str
    edge: str


@dataclass(frozen=True)
class EndSession:
    """Delete the session's Redis record (failures only logged: its keys expire)."""

    session_id: str


@dataclass(frozen=True)
class RecordAssignment:
    """Record the session's new verifier and/or edge in Redis (→ `Recorded` when `confirm`)."""

    session_id: str
    verifier: str | None
    edge: str
    confirm: bool = False


@dataclass(frozen=True)
class Verify:
    """Send one batch to a verifier → `BatchVerified`."""

    verifier: str
    trees: tuple[DraftTreeMsg, ...]


@dataclass(frozen=True)
class LoadRecord:
    session_id: str
    purpose: Literal["catch_up", "move"]
    tree: DraftTreeMsg | None = None
    move: Move | None = None


@dataclass(frozen=True)
class Rediscover:
    """Ask the bus who is there (`Discovered` each), then handle `then`."""

    then: Event


@dataclass(frozen=True)
class ScanOrphans:
    """Look in Redis for sessions not in `known` whose scheduler is not in `live` and that
    nothing has committed to for `timeout_s` (`orphaned`); claim each (or take those in
    `claimed`, claimed before) → `OrphanClaimed`/`OrphanGone` each, then `ScanDone`."""

    known: frozenset[str]
    live: frozenset[str]
    claimed: tuple[tuple[str, str], ...]  # (session, dead scheduler) claimed, not adopted yet
    timeout_s: float


@dataclass(frozen=True)
class TraceSession:
    session_id: str
    parent: Any = None
    adopted_from: str | None = None


@dataclass(frozen=True)
class TraceCycle:
    session_id: str
    cycle: int


@dataclass(frozen=True)
class TraceDraft:
    session_id: str
    cycle: int


@dataclass(frozen=True)
class TraceDelivery:
    """A cycle's delivery begins (its span); `TraceDelivered` ends it and the cycle."""

    session_id: str
    accepted: int
    committed: int
    finish_reason: str | None


@dataclass(frozen=True)
class TraceDelivered:
    session_id: str


@dataclass(frozen=True)
class TraceEnd:
    session_id: str
    error: str | None = None


Command = (Publish | Listen | StopListening | SuspendEdge | CreateSession | EndSession | RecordAssignment
           | Verify | LoadRecord | Rediscover | ScanOrphans | TraceSession | TraceCycle | TraceDraft
           | TraceDelivery | TraceDelivered | TraceEnd)
