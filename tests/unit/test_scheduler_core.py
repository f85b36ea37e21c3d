"""The scheduler's core, event in and commands out: no bus, no Redis, no clock — what the
service carries out and what the simulator drives."""

from __future__ import annotations

from specedge import protocol, registry, subjects
from specedge.protocol import (
    DraftAssign,
    DraftTreeMsg,
    EdgeRefused,
    Reason,
    Rejection,
    SamplingSpec,
    SessionOpen,
    SessionOpened,
    TokenEvent,
    VerifyBatchReply,
    VerifyResult,
)
from specedge.state import SessionRecord
from specedge_scheduler import core, events
from specedge_scheduler.guard import EdgeGuard, GuardLimits
from specedge_scheduler.policy import SchedulingPolicy

ME = "scheduler-1"


def new_core(**limits) -> core.SchedulerCore:
    policy = SchedulingPolicy(max_batch=4, strategy="fifo")
    return core.SchedulerCore(ME, policy, {"budget": 8, "depth": 3, "branch": 2, "beams": 4},
                              guard=EdgeGuard(GuardLimits(**limits)), heartbeat_s=1e9)


def of(commands, kind):
    return [c for c in commands if isinstance(c, kind)]


def published(commands, message_type):
    return [(c.subject, c.message) for c in commands if isinstance(c, events.Publish)
            and isinstance(c.message, message_type)]


def announce(c: core.SchedulerCore, role: str, instance: str, now: float, **details: str) -> list:
    ann = registry.announcement(role, instance_id=instance, **details)
    commands = c.handle(events.Announced(registry.announce_subject(ann), protocol.encode(ann)), now)
    for listen in of(commands, events.Listen):  # the service subscribes, and says so
        commands += c.handle(events.Listening(listen.edge, listen.announcement), now)
    return commands


def with_verifier_and_edge(**limits) -> core.SchedulerCore:
    c = new_core(**limits)
    announce(c, "verifier", "v1", 0.0, max_sessions="4")
    commands = announce(c, "edge-agent", "e1", 0.0, max_sessions="4", pool="shared")
    assert c.policy.edges["e1"].capacity == 4 and not of(commands, events.Publish)
    return c


def open_session(c: core.SchedulerCore, sid: str = "s1", max_new_tokens: int = 4, now: float = 0.0) -> list:
    request = SessionOpen(session_id=sid, tokens=[1, 2, 3], sampling=SamplingSpec(), max_new_tokens=max_new_tokens,
                          eos_ids=[99])
    (create,) = c.handle(events.OpenRequested(protocol.encode(request), "_INBOX.reply"), now)
    assert isinstance(create, events.CreateSession) and (create.verifier, create.edge) == ("v1", "e1")
    return c.handle(events.Prefilled(sid, None), now)


def draft(c: core.SchedulerCore, tree: DraftTreeMsg, now: float, edge: str = "e1") -> list:
    return c.handle(events.DraftReceived(subjects.drafts(edge, ME), protocol.encode(tree)), now)


def test_a_session_from_open_to_its_last_token():
    c = with_verifier_and_edge()
    commands = open_session(c)
    ((to_edge, assign),) = published(commands, DraftAssign)
    assert to_edge == subjects.edge_assign("e1") and assign.tokens == [1, 2, 3] and assign.budget == c.policy.budget
    ((reply, opened),) = published(commands, SessionOpened)
    assert reply == "_INBOX.reply" and opened.verifier == "v1" and opened.edge == "e1" and not opened.error

    tree = DraftTreeMsg(session_id="s1", cycle=0, committed_len=3, tokens=[5, 6], parents=[-1, 0])
    assert draft(c, tree, 0.1) == [events.TraceDraft("s1", 0)]
    (verify,) = c.handle(events.Tick(), 0.2)
    assert verify == events.Verify("v1", (tree,)) and c.busy == {"v1"}
    assert c.handle(events.Tick(), 0.21) == []  # one batch at a time per verifier

    reply = VerifyBatchReply(batch_id="b", forward_ms=5.0, results=[
        VerifyResult(session_id="s1", cycle=0, committed_len=3, accepted=[5, 6], bonus=7)])
    commands = c.handle(events.BatchVerified("v1", (tree,), reply), 0.3)
    ((_, tokens),) = published(commands, TokenEvent)
    assert tokens.tokens == [5, 6, 7] and tokens.index == 0 and not tokens.finished and tokens.accepted == 2
    ((to_edge, result),) = published(commands, VerifyResult)
    assert to_edge == subjects.edge_result("e1") and result.next_budget == c.policy.budget
    assert c.busy == set()

    tree = DraftTreeMsg(session_id="s1", cycle=1, committed_len=6, tokens=[8], parents=[-1])
    draft(c, tree, 0.4)
    (verify,) = c.handle(events.Tick(), 0.5)
    reply = VerifyBatchReply(batch_id="c", results=[
        VerifyResult(session_id="s1", cycle=1, committed_len=6, accepted=[8], bonus=9)])
    commands = c.handle(events.BatchVerified("v1", (tree,), reply), 0.6)
    ((_, tokens),) = published(commands, TokenEvent)
    assert tokens.tokens == [8] and tokens.finished and tokens.finish_reason == "length" and tokens.index == 3
    assert events.EndSession("s1") in commands and events.TraceEnd("s1") in commands
    assert {s for s, _ in published(commands, protocol.CloseSession)} == {subjects.verifier_close("v1"),
                                                                          subjects.edge_close("e1")}
    assert "s1" not in c.policy.sessions and "s1" not in c.outputs


def test_no_capacity_asks_the_bus_once_then_refuses():
    c = new_core()
    request = events.OpenRequested(protocol.encode(SessionOpen(session_id="s", tokens=[1], sampling=SamplingSpec(),
                                                                 max_new_tokens=4)),
                                 "_INBOX.r")
    (again,) = c.handle(request, 0.0)
    assert isinstance(again, events.Rediscover) and again.then.retried
    ((_, opened),) = published(c.handle(again.then, 0.0), SessionOpened)
    assert "no verifier has room" in opened.error


def test_an_edge_cut_off_elsewhere_is_not_listened_to():
    c = new_core()
    announce(c, "verifier", "v1", 0.0, max_sessions="4")
    ann = registry.announcement("edge-agent", instance_id="e1", max_sessions="4", pool="shared")
    (listen,) = c.handle(events.Announced(registry.announce_subject(ann), protocol.encode(ann)), 0.0)
    assert listen == events.Listen("e1", ann)
    assert c.handle(events.Listening("e1", ann, suspended_s=30.0), 0.0) == []  # Redis says: suspended
    assert "e1" not in c.policy.edges
    assert c.handle(events.Announced(registry.announce_subject(ann), protocol.encode(ann)), 1.0) == []


def test_an_edge_flooding_garbage_is_cut_off_once():
    c = with_verifier_and_edge(offence_limit=5)
    open_session(c)
    commands = []
    for i in range(8):
        commands += c.handle(events.DraftReceived(subjects.drafts("e1", ME), b"\x00garbage"), 1.0 + i / 100)
    assert of(commands, events.StopListening) == [events.StopListening("e1")]
    assert of(commands, events.SuspendEdge) == [events.SuspendEdge("e1", 300.0)]
    ((_, refused),) = published(commands, EdgeRefused)
    assert refused.reason == Reason.CUT_OFF
    assert "e1" not in c.policy.edges and c.policy.sessions["s1"].edge is None  # server steps now
    assert sum(c.reject.counts.values()) == 5  # later ones dropped unread


def test_a_failed_batch_goes_back_and_its_verifier_rests():
    c = with_verifier_and_edge()
    open_session(c)
    tree = DraftTreeMsg(session_id="s1", cycle=0, committed_len=3, tokens=[5], parents=[-1])
    draft(c, tree, 0.1)
    (verify,) = c.handle(events.Tick(), 0.2)
    assert c.handle(events.BatchVerified("v1", verify.trees, None, "timeout"), 0.3) == []
    assert c.handle(events.Tick(), 0.4) == [] and c.wake_at <= 0.3 + c.tuning.failed_batch_rest_s
    assert c.handle(events.Tick(), 0.3 + c.tuning.failed_batch_rest_s) == [verify]  # the same tree, again


def test_a_session_whose_redis_stays_unreachable_fails_after_the_request_timeout():
    c = with_verifier_and_edge()
    c.request_timeout_s = 2.0
    open_session(c)
    tree = DraftTreeMsg(session_id="s1", cycle=0, committed_len=3, tokens=[5], parents=[-1])
    draft(c, tree, 0.1)
    now, failed = 0.2, []
    unavailable = VerifyBatchReply(batch_id="b", rejected=[Rejection(session_id="s1",
                                                                          reason=Reason.STATE_UNAVAILABLE)])
    while not failed and now < 10:
        commands = c.handle(events.Tick(), now)
        for verify in of(commands, events.Verify):
            commands += c.handle(events.BatchVerified("v1", verify.trees, unavailable), now)
        failed = [m for _, m in published(commands, TokenEvent) if m.error]
        now += 0.1
    assert failed and "unreachable" in failed[0].error and 2.0 < now < 3.5
    assert "s1" not in c.policy.sessions


def test_a_lost_reply_is_caught_up_from_the_record():
    c = with_verifier_and_edge()
    open_session(c)
    tree = DraftTreeMsg(session_id="s1", cycle=0, committed_len=3, tokens=[5], parents=[-1])
    draft(c, tree, 0.1)
    c.handle(events.Tick(), 0.2)
    stale = VerifyBatchReply(batch_id="b", rejected=[Rejection(session_id="s1", reason=Reason.STALE_CYCLE)])
    (load,) = c.handle(events.BatchVerified("v1", (tree,), stale), 0.3)
    assert load == events.LoadRecord("s1", "catch_up", tree=tree)
    record = SessionRecord(session_id="s1", tokens=[1, 2, 3, 5, 7], sampling=SamplingSpec(), cycle=1)
    commands = c.handle(events.RecordLoaded("s1", "catch_up", record, tree), 0.4)
    ((_, tokens),) = published(commands, TokenEvent)
    assert tokens.tokens == [5, 7]  # delivered from Redis, not drafted again
