"""The dashboard's timeline over a real nats-server: a service whose monotonic clock is far
from the gateway's (another host) still has its spans placed right, and one that does not
answer is shown as silent."""

import asyncio
import time

from specedge import bus, protocol, registry, subjects
from specedge.protocol import ServiceStats, StatsRequest
from specedge_gateway.timeline import Timeline

SKEW = 12_345.0  # the other host's clock runs this far ahead of ours


def test_spans_of_a_host_with_another_clock_are_aligned(nats_url):
    async def scenario():
        async with bus.connect(nats_url, "skewed-edge") as edge_nc, bus.connect(nats_url, "gateway") as gw_nc:
            me = registry.announcement("edge-agent", "skewed", heartbeat_s=1.0, pool="shared")
            silent = registry.announcement("verifier", "silent", heartbeat_s=1.0)
            asked: list[StatsRequest] = []

            async def on_stats(msg):
                request = protocol.decode(msg.data, StatsRequest)
                asked.append(request)
                now = time.monotonic() + SKEW
                spans = [[now - 10.0, now - 9.5], [now - 2.0, now - 1.5], [now - 0.4, now - 0.3]]
                spans = [s for s in spans if s[0] >= request.cutoff(now)]
                await msg.respond(protocol.encode(ServiceStats(instance_id=me.instance_id, spans=spans, now=now)))

            await edge_nc.subscribe(subjects.stats("edge-agent", me.instance_id), cb=on_stats)
            async with registry.presence(edge_nc, me), registry.presence(edge_nc, silent):
                snapshot = await Timeline(gw_nc).snapshot(window_s=5.0)
            return snapshot, asked

    snapshot, asked = asyncio.run(scenario())
    assert asked and asked[0].window_s == 5.0
    rows = {r["name"]: r for r in snapshot["rows"]}
    assert [r["name"] for r in snapshot["rows"]] == ["silent", "skewed"]  # verifiers first
    assert rows["silent"]["ok"] is False and rows["silent"]["spans"] == []
    skewed = rows["skewed"]
    assert skewed["ok"] and len(skewed["spans"]) == 2  # the span 10 s ago is outside the window
    for (start, end), (want_start, want_end) in zip(skewed["spans"], [(-2.0, -1.5), (-0.4, -0.3)], strict=True):
        assert abs(start - want_start) < 0.05 and abs(end - want_end) < 0.05
    assert abs(skewed["busy"] - 0.6 / 5) < 0.01
