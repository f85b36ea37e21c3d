"""The draft/verify timeline of the last few seconds, from every live verifier and edge agent.

Services answer `StatsRequest`s on `specedge.v1.stats.<role>.<id>` with their recent
forward-pass spans — a verifier's verification passes, an edge agent's drafting passes
(proactive drafting included) — as [start, end] on their own monotonic clock, and that
clock's reading when they replied (`ServiceStats.now`). The gateway maps each host's
clock onto its own: the reply was made, give or take half the request's round trip, at
the midpoint between sending the request and receiving the answer. Spans come back in
seconds relative to the gateway's now (negative: in the past).

Which services exist comes from registry discovery, cached for `DISCOVERY_TTL_S`.
Schedulers are asked for their counters (sessions, queued trees, edges).
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client

from specedge import bus, protocol, registry, subjects
from specedge.protocol import ServiceAnnouncement, ServiceStats, StatsRequest, union_s

log = logging.getLogger("specedge_gateway")

DISCOVERY_TTL_S = 3.0
STATS_TIMEOUT_S = 1.0
MAX_ROWS = 64  # services asked per refresh: bounds the cost of a large pool of edges


def merged(spans: list[list[float]], gap: float) -> list[list[float]]:
    """Spans sorted, those closer than `gap` joined: a drawing cannot tell them apart anyway."""
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start - out[-1][1] < gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out



class Timeline:
    """Asks live services for their recent spans; one instance per gateway."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._services: list[ServiceAnnouncement] = []
        self._discovered_at = float("-inf")
        self._lock = asyncio.Lock()

    async def services(self) -> list[ServiceAnnouncement]:
        async with self._lock:
            if time.monotonic() - self._discovered_at > DISCOVERY_TTL_S:
                try:
                    self._services = await registry.discover(self.nc, wait_s=0.15)
                except Exception as exc:  # NATS unreachable right now: show what we knew
                    log.debug("discovery failed: %r", exc)
                self._discovered_at = time.monotonic()
            return self._services

    async def _ask(self, service: ServiceAnnouncement,
                   window_s: float) -> tuple[ServiceStats, float | None] | None:
        """The service's stats and its clock's offset to ours (ours = theirs + offset; None if
        unknown); None if it did not answer."""
        request = protocol.encode(StatsRequest(window_s=window_s))
        sent = time.monotonic()
        try:
            reply = await bus.request(self.nc, subjects.stats(service.role, service.instance_id), request,
                                      timeout=STATS_TIMEOUT_S)
            stats = protocol.decode(reply.data, ServiceStats)
        except Exception as exc:  # gone, busy, disconnected, or a malformed reply
            log.debug("no stats from %s: %r", service.instance_id, exc)
            return None
        if not stats.now:  # a service too old to say its clock: its spans cannot be placed
            return stats, None
        return stats, (sent + time.monotonic()) / 2 - stats.now

    async def snapshot(self, window_s: float) -> dict:
        """Rows of spans (verifiers first, then edge agents by name) and scheduler counters."""
        found = await self.services()
        wanted = [s for s in found if s.role in ("verifier", "edge-agent", "scheduler")][:MAX_ROWS]
        answers = await asyncio.gather(*(self._ask(s, window_s) for s in wanted))
        now = time.monotonic()
        rows, schedulers = [], []
        for service, answer in zip(wanted, answers, strict=True):
            if service.role == "scheduler":
                if answer is not None:
                    schedulers.append({"name": service.name, "counters": answer[0].counters})
                continue
            row = {"role": service.role, "name": service.name, "pool": service.details.get("pool", ""),
                   "ok": answer is not None and answer[1] is not None, "spans": [], "busy": 0.0}
            if row["ok"]:
                stats, offset = answer
                spans = [[max(-window_s, a + offset - now), min(0.0, b + offset - now)]
                         for a, b in stats.spans if b + offset - now >= -window_s]
                row["spans"] = [[round(a, 4), round(b, 4)] for a, b in merged(spans, window_s / 2000) if b > a]
                row["busy"] = round(union_s(row["spans"]) / window_s, 4)
            rows.append(row)
        order = {"verifier": 0, "edge-agent": 1}
        rows.sort(key=lambda r: (order[r["role"]], r["pool"] == "server", r["name"]))
        return {"window_s": window_s, "rows": rows, "schedulers": schedulers}
