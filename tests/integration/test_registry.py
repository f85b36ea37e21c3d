"""Presence on a real NATS server: announce, discover, heartbeat, leave; bad replies ignored."""

import asyncio

import nats

from specedge import protocol, registry, subjects
from specedge.protocol import ServiceLeave, decode


async def test_presence_is_discoverable_and_leaves(nats_url):
    nc = await nats.connect(nats_url)
    watcher = await nats.connect(nats_url)
    leaves = await watcher.subscribe(subjects.REGISTRY_LEAVE_ALL)
    beats = await watcher.subscribe(subjects.REGISTRY_ANNOUNCE_ALL)
    me = registry.announcement("scheduler", "sched-test", heartbeat_s=0.1, zone="a")
    async with registry.presence(nc, me):
        found = await registry.discover(watcher, wait_s=0.3)
        assert me in found
        beat = await beats.next_msg(timeout=2)
        assert beat.subject == subjects.registry_announce("scheduler", me.instance_id)
    leave = decode((await leaves.next_msg(timeout=2)).data, ServiceLeave)
    assert leave.instance_id == me.instance_id
    assert me not in await registry.discover(watcher, wait_s=0.3)
    await nc.close()
    await watcher.close()


async def test_garbage_and_forged_discovery_answers_are_ignored(nats_url):
    """Garbage; a verifier's announcement sent to the asker's inbox (where anyone could claim
    any role); a verifier's announcement on an edge's subject: none of them is believed."""
    rogue = await nats.connect(nats_url)
    forged = registry.announcement("verifier", "evil", heartbeat_s=5, max_sessions="4096")

    async def answer_with_garbage_and_lies(msg):
        await msg.respond(b"\xc1not msgpack")
        await msg.respond(protocol.encode(forged))
        await rogue.publish(subjects.registry_announce("edge-agent", "evil-edge"), protocol.encode(forged))

    await rogue.subscribe(subjects.REGISTRY_DISCOVER, cb=answer_with_garbage_and_lies)
    nc = await nats.connect(nats_url)
    me = registry.announcement("verifier", heartbeat_s=5)
    async with registry.presence(nc, me):
        found = await registry.discover(nc, wait_s=0.3)
    assert [a.instance_id for a in found if a.role == "verifier"] == [me.instance_id]
    await asyncio.gather(rogue.close(), nc.close())
