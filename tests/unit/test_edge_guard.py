"""What one edge may cost: the guard's buckets, offences and cut-off (pure, clock passed in),
and the policy's judgement of edges whose drafts are not accepted."""

from specedge.protocol import DraftTreeMsg
from specedge_scheduler.guard import EdgeGuard, GuardLimits, Verdict
from specedge_scheduler.policy import Move, SchedulingPolicy, Tuning

LIMITS = GuardLimits(max_draft_bytes=100, drafts_per_s=10, drafts_per_s_per_session=10, burst_s=1,
                     announcements_per_s=2, offence_limit=5, window_s=10, suspend_s=60)


def test_drafts_are_limited_in_size_and_rate_by_the_edges_sessions():
    guard = EdgeGuard(LIMITS)
    assert guard.draft("e", 101, sessions=0, now=0) == Verdict.OVERSIZED
    assert [guard.draft("e", 10, sessions=0, now=0) for _ in range(11)] == [Verdict.ADMIT] * 10 + [Verdict.OVER_RATE]
    assert guard.draft("e", 10, sessions=0, now=0.1) == Verdict.ADMIT  # refilled at 10/s
    assert guard.draft("other", 10, sessions=0, now=0) == Verdict.ADMIT  # buckets are per edge
    # an edge drafting for more sessions may send more
    busy = EdgeGuard(LIMITS)
    assert sum(busy.draft("b", 10, sessions=3, now=t / 100) == Verdict.ADMIT for t in range(100)) > 40


def test_offences_within_the_window_cut_an_edge_off_until_its_suspension_ends():
    guard = EdgeGuard(LIMITS)
    assert [guard.offence("e", now=t) for t in range(4)] == [False] * 4
    assert guard.offence("e", now=20)  is False  # the old ones left the 10 s window
    assert [guard.offence("e", now=20.1 + t / 10) for t in range(4)] == [False, False, False, True]
    assert guard.suspended("e", now=21)
    assert guard.draft("e", 10, sessions=0, now=30) == Verdict.SUSPENDED
    assert guard.announcement("e", now=30) == Verdict.SUSPENDED
    assert guard.offence("e", now=30) is False  # nothing more to count while cut off
    assert not guard.suspended("e", now=81) and guard.draft("e", 10, sessions=0, now=81) == Verdict.ADMIT


def test_announcements_are_rate_limited_per_edge():
    guard = EdgeGuard(LIMITS)
    assert [guard.announcement("e", now=0) for _ in range(3)] == [Verdict.ADMIT] * 2 + [Verdict.OVER_RATE]
    assert guard.announcement("e", now=0.5) == Verdict.ADMIT


def policy_with_two_edges() -> SchedulingPolicy:
    p = SchedulingPolicy(max_batch=8, strategy="fifo", budget=32, min_budget=4)
    p.verifier_seen("v", capacity=8, now=0)
    p.edge_seen("bad", capacity=4, now=0)
    p.edge_seen("good", capacity=4, now=0)
    return p


def run_cycle(p: SchedulingPolicy, sid: str, edge: str, accepted: int) -> Move | None:
    state = p.sessions[sid]
    tree = DraftTreeMsg(session_id=sid, cycle=state.cycle, committed_len=state.committed_len, tokens=[1, 2],
                        parents=[-1, 0])
    assert p.draft_arrived(tree, edge, now=1.0) is None
    assert p.next_batch("v") == [tree]
    p.verified(sid, accepted + 1, now=1.0)
    return p.rehome(sid)


def test_an_edge_whose_trees_are_not_accepted_loses_its_sessions_at_a_cycle_boundary():
    p = policy_with_two_edges()
    p.assign("s", 10)  # "good" and "bad" have equal room: the id breaks the tie
    p.draft_due("s", 0.0)
    assert p.sessions["s"].edge == "good"
    p.edges["good"].capacity = 0  # full: the next session goes to "bad"
    p.assign("t", 10)
    p.draft_due("t", 0.0)
    assert p.sessions["t"].edge == "bad"
    p.edges["good"].capacity = 4
    moves = [run_cycle(p, "t", "bad", accepted=0) for _ in range(Tuning().judge_after)]
    assert moves[:-1] == [None] * (Tuning().judge_after - 1)  # judged only after JUDGE_AFTER trees
    assert moves[-1] == Move("t", "bad", "good", "useless_drafter")
    assert p.sessions["t"].edge == "good" and p.sessions["t"].in_flight  # until the new edge is told
    assert "t" not in p.edges["bad"].sessions and "t" in p.edges["good"].sessions
    assert not p.helps("bad") and p.helps("good")
    p.assign("u", 10)
    assert p.sessions["u"].edge == "good"  # no new sessions for it either


def test_trees_shrink_with_what_the_edge_accepts_and_a_session_waits_for_an_edge_with_room():
    p = policy_with_two_edges()
    p.edges["good"].capacity = 0
    p.assign("t", 10)
    p.draft_due("t", 0.0)
    for _ in range(Tuning().judge_after - 1):
        run_cycle(p, "t", "bad", accepted=0)
    assert p.shape_for("t") == (32, 4)  # not judged yet
    timing = p.timings["bad"]
    timing.accepted_per_tree, timing.verifications = 0.5, Tuning().judge_after  # half a token per tree
    assert p.shape_for("t") == (16, 4)
    timing.accepted_per_tree = 0.1
    assert p.shape_for("t") == (4, 4)  # never below min_budget
    # judged useless with no other edge to go to: server steps, and it gets the next edge with room
    assert run_cycle(p, "t", "bad", accepted=0) == Move("t", "bad", None, "useless_drafter")
    assert p.sessions["t"].edge is None and p.server_side_trees()[0].tokens == []
    p.edges["good"].capacity = 4
    p.verified("t", 1, now=2.0)
    assert p.rehome("t") == Move("t", None, "good", "drafter_free")
    p.unhome("t")  # the move could not be carried out: server steps again, and never "good" again
    assert p.sessions["t"].edge is None and not p.sessions["t"].in_flight
    assert p.rehome("t") is None
