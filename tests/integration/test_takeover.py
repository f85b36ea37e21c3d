"""Taking over a dead scheduler's session when the state store fails half-way.

A scheduler claims an orphaned session in Redis and then loses Redis before it has
recorded the session's new verifier: it must let go of the session in memory (nothing
half-adopted, no request left waiting forever) and adopt it at its next scan — although
the record now names it as the owner. Real redis-server; the bus is a recorder (no
message leaves this process)."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from specedge.protocol import SamplingSpec
from specedge.state import SessionStore, session_key
from specedge_scheduler import events
from specedge_scheduler.policy import SchedulingPolicy
from specedge_scheduler.service import SchedulerService


class RecordingBus:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def publish(self, subject, payload=b"", reply="", headers=None):
        self.sent.append(subject)


class StoreLosingRedisOnce(SessionStore):
    """The real store, except that recording the new owner fails the first time."""

    failures = 1

    async def assign(self, session_id: str, **owners: str) -> None:
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("connection lost (injected)")
        await super().assign(session_id, **owners)


async def scan(svc: SchedulerService) -> None:
    """One scan for orphans, as the core asks for it (only this scheduler is alive)."""
    await svc._scan(events.ScanOrphans(frozenset(svc.policy.sessions), frozenset({svc.instance_id}),
                                     tuple(svc.core._claimed.items()), svc.policy.verifier_timeout_s))


def test_a_session_claimed_but_not_adopted_is_adopted_at_the_next_scan(redis_url, caplog):
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        store = StoreLosingRedisOnce(client)
        await store.create("orphan-1", [1, 2, 3], SamplingSpec(), mode="autoregressive", scheduler="dead-1",
                           verifier="v1", max_new_tokens=8, eos_ids=[99])
        await client.expire(session_key("orphan-1"), store.ttl_s - 20)  # nothing committed for 20 s
        policy = SchedulingPolicy(max_batch=4, strategy="fifo")
        policy.verifier_seen("v1", capacity=4, now=time.monotonic())
        bus = RecordingBus()
        svc = SchedulerService(bus, "sched-2", store, policy, draft_shape={"budget": 8, "depth": 3})

        await scan(svc)  # claimed, then Redis fails: let go, in memory
        record = await store.load("orphan-1")
        assert record.scheduler == "sched-2"  # the claim stands in Redis
        assert "orphan-1" not in policy.sessions and "orphan-1" not in svc.core.outputs
        assert not any(s.endswith(".tokens") for s in bus.sent)

        await scan(svc)  # the next scan adopts it, although it names us
        assert "orphan-1" in policy.sessions and "orphan-1" in svc.core.outputs
        assert policy.sessions["orphan-1"].verifier == "v1"
        assert (await store.load("orphan-1")).verifier == "v1"
        assert svc.core._claimed == {}

        await scan(svc)  # held now: not adopted twice
        assert len([s for s in policy.sessions if s == "orphan-1"]) == 1
        await store.end("orphan-1")
        await client.aclose()

    asyncio.run(scenario())
    assert "took over session orphan-1 from scheduler dead-1" in caplog.text  # whom it was taken from
