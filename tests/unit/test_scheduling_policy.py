"""The scheduler's pure policy: assignment, draft checks, batches, trees sent ahead, edge loss."""

import pytest

from specedge.protocol import MAX_TREES_AHEAD, DraftTreeMsg
from specedge_scheduler.policy import NoCapacityError, SchedulingPolicy, Tuning
from specedge_scheduler.timing import EdgeTiming


def tree(session: str, cycle: int = 0, length: int = 10) -> DraftTreeMsg:
    return DraftTreeMsg(session_id=session, cycle=cycle, committed_len=length, tokens=[1], parents=[-1])


def opened(p: SchedulingPolicy, session: str, length: int = 10, **kwargs):
    """Assign a session and mark it prefilled (as the service does once its verifier answers)."""
    assignment = p.assign(session, length, **kwargs)
    p.draft_due(session, 0.0)
    return assignment


def policy() -> SchedulingPolicy:
    p = SchedulingPolicy(max_batch=2, edge_timeout_s=5, strategy="fifo")
    p.verifier_seen("v1", capacity=2, now=0)
    p.verifier_seen("v2", capacity=1, now=0)
    p.edge_seen("e1", capacity=1, now=0)
    return p


def test_least_loaded_assignment_and_capacity():
    p = policy()
    a = p.assign("s1", 10)
    assert (a.verifier, a.edge) == ("v1", "e1")
    b = p.assign("s2", 10)
    assert b.edge is None  # the only edge is full: drafted server-side
    p.assign("s3", 10)
    with pytest.raises(NoCapacityError):
        p.assign("s4", 10)
    p.finish("s1")
    assert p.assign("s4", 10).edge == "e1"


def test_paged_verifiers_are_chosen_by_free_kv_tokens_and_refuse_what_does_not_fit():
    p = SchedulingPolicy(strategy="fifo")
    p.verifier_seen("small", capacity=64, now=0, free_tokens=3000)
    p.verifier_seen("large", capacity=64, now=0, free_tokens=5000)
    assert p.assign("a", 2000).verifier == "large"  # most free tokens; 2000 + headroom are then spoken for
    assert p.assign("b", 2000).verifier == "small"
    with pytest.raises(NoCapacityError):
        p.assign("c", 3000)  # neither has 3000 tokens left, whatever its session count
    p.verifier_seen("small", capacity=64, now=1, free_tokens=4000)  # its next announcement
    assert p.assign("c", 3000).verifier == "small"


def test_an_edge_with_another_tokenizer_gets_no_sessions():
    p = SchedulingPolicy(strategy="fifo")
    p.verifier_seen("v", capacity=4, now=0, fingerprint="abc")
    assert p.edge_seen("good", capacity=4, now=0, fingerprint="abc")
    assert not p.edge_seen("alien", capacity=9, now=0, fingerprint="xyz")
    assert {p.assign(f"s{i}", 5).edge for i in range(3)} == {"good"}


def test_drafts_are_checked_against_the_session():
    p = policy()
    opened(p, "s1", 10)
    assert p.draft_arrived(tree("ghost"), "e1") == "unknown_session"
    assert p.draft_arrived(tree("s1"), "e9") == "not_the_sessions_edge"
    assert p.draft_arrived(tree("s1", cycle=3), "e1") == "stale_cycle"
    assert p.draft_arrived(tree("s1"), "e1") is None
    assert p.draft_arrived(tree("s1"), "e1") == "duplicate_draft"
    assert p.next_batch("v1") == [tree("s1")]
    p.verified("s1", new_tokens=3)
    assert p.draft_arrived(tree("s1", cycle=1, length=13), "e1") is None


def test_batches_are_fifo_and_bounded():
    p = SchedulingPolicy(max_batch=2, strategy="fifo")
    p.verifier_seen("v", capacity=8, now=0)
    for i in range(3):
        p.edge_seen(f"e{i}", capacity=1, now=0)
        opened(p, f"s{i}", 5)
    for i in (2, 0, 1):
        assert p.draft_arrived(tree(f"s{i}", length=5), p.sessions[f"s{i}"].edge) is None
    assert [t.session_id for t in p.next_batch("v")] == ["s2", "s0"]
    assert [t.session_id for t in p.next_batch("v")] == ["s1"]
    assert p.next_batch("v") == []


def test_a_silent_edge_expires_and_its_sessions_continue_server_side():
    p = policy()
    opened(p, "s1", 10)
    p.edge_seen("e1", capacity=1, now=3)
    assert p.expire_edges(now=7) == {}
    assert p.expire_edges(now=9) == {"e1": ["s1"]}
    assert p.sessions["s1"].edge is None
    queued = p.server_side_trees()
    assert [(t.session_id, t.tokens) for t in queued] == [("s1", [])]
    assert p.server_side_trees() == []  # one in flight at a time
    assert p.next_batch("v1") == queued
    p.requeue(queued)  # the verifier did not answer: the same trees wait again
    assert p.server_side_trees() == []
    assert p.next_batch("v1") == queued


def test_users_get_their_own_edge_then_the_shared_pool_then_the_server_never_another_users():
    p = SchedulingPolicy(strategy="fifo")
    p.verifier_seen("v", capacity=9, now=0)
    p.edge_seen("alice-gpu", capacity=1, now=0, user="alice", pool="user")
    p.edge_seen("bob-gpu", capacity=5, now=0, user="bob", pool="user")
    p.edge_seen("pool", capacity=1, now=0)
    p.edge_seen("server", capacity=5, now=0, pool="server")
    assert p.assign("a1", 5, user="alice").edge == "alice-gpu"
    assert p.assign("a2", 5, user="alice").edge == "pool"
    assert p.assign("a3", 5, user="alice").edge == "server"
    assert p.assign("c1", 5, user="carol").edge == "server"
    assert p.assign("anon", 5).edge == "server"
    assert p.assign("so", 5, mode="server-only", user="bob").edge == "server"
    assert p.assign("ar", 5, mode="autoregressive", user="bob").edge is None
    assert p.assign("b1", 5, user="bob").edge == "bob-gpu"
    assert "bob-gpu" not in {s.edge for s in p.sessions.values() if s.user != "bob"}
    with pytest.raises(ValueError, match="user edge"):
        p.edge_seen("odd", capacity=1, now=0, user="", pool="user")


def test_a_lost_verifier_hands_its_sessions_and_queued_trees_to_another():
    p = policy()
    opened(p, "s1", 10)  # v1 (most room), e1
    opened(p, "s2", 10)  # v1 and v2 tie on room: v2 by name
    assert p.sessions["s1"].verifier == "v1"
    assert p.draft_arrived(tree("s1"), "e1") is None
    p.verifier_seen("v2", capacity=1, now=4)
    p.verifier_seen("v2", capacity=2, now=4)
    assert p.expire_verifiers(now=5) == {}
    moved = p.expire_verifiers(now=7)
    assert set(moved) == {"v1"}
    assert p.sessions["s1"].verifier == "v2"
    assert p.next_batch("v2") == [tree("s1")]  # its queued tree followed it
    assert p.verifier_gone("v2") == ["s1", "s2"]  # nowhere left to go: the service ends them
    assert "v2" not in p.verifiers


def test_refused_trees_become_server_steps_until_the_session_gives_up():
    p = policy()
    opened(p, "s1", 10)
    assert p.draft_arrived(tree("s1"), "e1") is None
    batch = p.next_batch("v1")
    assert p.refused(batch[0])
    step = p.next_batch("v1")
    assert [(t.cycle, t.committed_len, t.tokens) for t in step] == [(0, 10, [])]
    assert p.refused(step[0])
    assert not p.refused(p.next_batch("v1")[0])


def test_policy_imports_neither_nats_nor_redis_and_light_services_never_torch():
    import subprocess
    import sys

    code = ("import sys, specedge_scheduler.policy; "
            "heavy = {'nats', 'redis', 'torch'} & set(sys.modules); assert not heavy, heavy; "
            "import specedge_scheduler.main, specedge_gateway.app, specedge_gateway.openai_api; "
            "assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_tree_is_queued_before_the_session_is_prefilled():
    p = policy()
    p.assign("s1", 10, mode="autoregressive")
    assert p.server_side_trees() == []  # its verifier has not prefilled it yet
    assert p.draft_arrived(tree("s1"), "e1") is not None
    p.draft_due("s1", 0.0)
    assert [t.session_id for t in p.server_side_trees()] == ["s1"]


def test_a_session_taken_over_keeps_its_verifier_and_goes_on_from_its_committed_cycle():
    p = policy()
    p.assign("other", 10)  # v1 now has less room than v2 would after…
    a = p.assign("orphan", 25, prefer="v1", cycle=3)  # …but the orphan's cache is on v1
    p.draft_due("orphan", 0.0)
    assert a.verifier == "v1" and (p.sessions["orphan"].cycle, p.sessions["orphan"].committed_len) == (3, 25)
    assert a.edge is None  # the only edge is taken: server steps, from where it was
    steps = {t.session_id: (t.cycle, t.committed_len) for t in p.server_side_trees()}
    assert steps["orphan"] == (3, 25)
    b = p.assign("moved", 12, prefer="gone-verifier", cycle=1)  # its verifier is gone: the one with most room
    assert b.verifier == "v2" and p.sessions["moved"].cycle == 1


def test_refusals_that_say_nothing_about_the_session_never_end_it():
    p = policy()
    opened(p, "s1", 10)
    for _ in range(10 * Tuning().max_refusals):
        assert p.refused(tree("s1"), count=False)
        p.next_batch("v1")
    assert p.sessions["s1"].refusals == 0


def test_after_the_bus_was_down_nobody_is_expired_for_its_silence():
    p = policy()
    opened(p, "s1", 10)
    p.seen_all(now=100)  # the first heartbeat after an outage
    assert p.expire_verifiers(now=104) == {} and p.expire_edges(now=104) == {}
    assert set(p.expire_edges(now=106)) == {"e1"}


def test_the_draft_deadline_follows_the_edges_measured_turnaround():
    p = SchedulingPolicy(max_batch=2, edge_timeout_s=60, draft_timeout_s=5.0, strategy="fifo")
    p.verifier_seen("v1", capacity=4, now=0)
    p.edge_seen("e1", capacity=4, now=0)
    opened(p, "s1", 10)
    assert p.expire_drafts(now=4.9) == {}  # a first tree: the edge prefills first, full timeout
    now, length = 0.0, 10
    for cycle in range(5):  # fast cycles: 50 ms turnaround
        now += 0.05
        assert p.draft_arrived(tree("s1", cycle, length), "e1", now=now) is None
        p.next_batch("v1")
        p.verified("s1", 2, now)
        length += 2
    assert p.expire_drafts(now=now + 0.9) == {}  # at least MIN_DRAFT_DEADLINE_S
    assert p.expire_drafts(now=now + 1.1) == {"e1": ["s1"]}  # a dead edge: on within about a second
    assert p.sessions["s1"].edge is None

    slow = SchedulingPolicy(max_batch=2, edge_timeout_s=60, draft_timeout_s=5.0, strategy="fifo")
    slow.verifier_seen("v1", capacity=4, now=0)
    slow.edge_seen("e1", capacity=4, now=0)
    opened(slow, "s1", 10)
    assert slow.draft_arrived(tree("s1", 0, 10), "e1", now=0.8) is None  # a slow edge: 0.8 s per tree
    slow.next_batch("v1")
    slow.verified("s1", 2, 0.8)
    assert slow.expire_drafts(now=0.8 + 3.1) == {}  # 4 × 0.8 s
    assert slow.expire_drafts(now=0.8 + 3.3) == {"e1": ["s1"]}


def ahead(session: str, cycle: int, length: int, assumed: list[int]) -> DraftTreeMsg:
    """A tree sent ahead: drafted from the guess that the previous cycle commits `assumed`."""
    return DraftTreeMsg(session_id=session, cycle=cycle, committed_len=length, tokens=[1], parents=[-1],
                        assumed=assumed)


def in_flight(session: str = "s1") -> SchedulingPolicy:
    p = policy()
    opened(p, session, 10)
    assert p.draft_arrived(tree(session), "e1") is None
    assert p.next_batch("v1") == [tree(session)]  # cycle 0 is being verified
    return p


def test_a_tree_sent_ahead_on_a_right_guess_is_verified_as_soon_as_the_result_is_in():
    p = in_flight()
    early = ahead("s1", cycle=1, length=13, assumed=[5, 6, 7])
    assert p.draft_arrived(early, "e1") is None
    assert p.next_batch("v1") == []  # held: its guess is not known to be right yet
    p.verified("s1", [5, 6, 7], now=1.0)
    assert p.release_ahead("s1") == early
    assert p.next_batch("v1") == [early]
    assert p.expire_drafts(now=100.0) == {}  # nothing is due from the edge for this cycle
    assert p.draft_arrived(tree("s1", cycle=1, length=13), "e1") == "duplicate_draft"


def test_a_tree_sent_ahead_on_a_wrong_guess_is_dropped_and_the_edge_drafts_again():
    p = in_flight()
    assert p.draft_arrived(ahead("s1", cycle=1, length=13, assumed=[5, 6, 8]), "e1") is None
    p.verified("s1", [5, 6, 7], now=1.0)  # same length, other tokens: it must not be verified
    assert p.release_ahead("s1") is None
    assert p.next_batch("v1") == []
    assert p.draft_arrived(tree("s1", cycle=1, length=13), "e1") is None  # the fresh tree
    assert p.next_batch("v1") == [tree("s1", cycle=1, length=13)]


def test_a_tree_sent_ahead_that_arrives_after_the_result_counts_only_if_its_guess_was_right():
    p = in_flight()
    p.verified("s1", [5, 6, 7], now=1.0)
    assert p.draft_arrived(ahead("s1", cycle=1, length=13, assumed=[5, 6, 8]), "e1") == "ahead_unused"
    assert p.draft_arrived(ahead("s1", cycle=1, length=12, assumed=[5, 6]), "e1") == "ahead_unused"
    late = ahead("s1", cycle=1, length=13, assumed=[5, 6, 7])
    assert p.draft_arrived(late, "e1") is None
    assert p.next_batch("v1") == [late]


def test_one_tree_ahead_per_cycle_and_only_while_the_cycle_before_is_in_flight_or_held():
    p = policy()
    opened(p, "s1", 10)
    # cycle 0 not even sent: built on a guess already dropped (no offence)
    assert p.draft_arrived(ahead("s1", 1, 13, [5, 6, 7]), "e1") == "ahead_unused"
    assert p.draft_arrived(tree("s1"), "e1") is None
    assert p.draft_arrived(ahead("s1", 1, 13, [5, 6, 7]), "e1") is None
    assert p.draft_arrived(ahead("s1", 1, 12, [5, 6]), "e1") == "duplicate_draft"
    assert p.draft_arrived(ahead("s1", 2, 20, [5]), "e1") == "stale_cycle"  # not on the held tree's length
    assert p.draft_arrived(ahead("s1", 1 + MAX_TREES_AHEAD, 99, [5]), "e1") == "stale_cycle"  # too far ahead
    p.finish("s1")  # a session that ends drops what it held and what was queued
    assert p.next_batch("v1") == []
    assert p.draft_arrived(ahead("s1", 1, 13, [5, 6, 7]), "e1") == "ahead_unused"  # late: no offence


def test_a_chain_of_trees_sent_ahead_is_released_cycle_by_cycle_while_its_guesses_come_true():
    p = in_flight()
    first = ahead("s1", cycle=1, length=13, assumed=[5, 6, 7])
    second = ahead("s1", cycle=2, length=15, assumed=[8, 9])  # guesses the result of `first`
    assert p.draft_arrived(second, "e1") == "ahead_unused"  # nothing held to build on (dropped): no offence
    assert p.draft_arrived(first, "e1") is None and p.draft_arrived(second, "e1") is None
    assert p.draft_arrived(ahead("s1", cycle=2, length=15, assumed=[8, 9]), "e1") == "duplicate_draft"
    p.verified("s1", [5, 6, 7], now=1.0)
    assert p.release_ahead("s1") == first
    assert p.next_batch("v1") == [first]
    p.verified("s1", [8, 9], now=2.0)
    assert p.release_ahead("s1") == second
    assert p.next_batch("v1") == [second]


def test_a_wrong_guess_drops_every_tree_built_on_it():
    p = in_flight()
    assert p.draft_arrived(ahead("s1", cycle=1, length=13, assumed=[5, 6, 8]), "e1") is None
    assert p.draft_arrived(ahead("s1", cycle=2, length=15, assumed=[8, 9]), "e1") is None
    p.verified("s1", [5, 6, 7], now=1.0)
    assert p.release_ahead("s1") is None and p.sessions["s1"].ahead == {}
    # the edge's fresh tree for cycle 1, then a late tree of the dropped chain: no offence, not used
    assert p.draft_arrived(ahead("s1", cycle=2, length=15, assumed=[8, 9]), "e1") == "ahead_unused"
    assert p.draft_arrived(tree("s1", cycle=1, length=13), "e1") is None
    assert p.next_batch("v1") == [tree("s1", cycle=1, length=13)]
    p.verified("s1", [8, 9], now=2.0)
    assert p.release_ahead("s1") is None
    assert p.next_batch("v1") == []


def test_a_tree_ahead_is_dropped_when_its_session_loses_its_edge():
    p = in_flight()
    assert p.draft_arrived(ahead("s1", 1, 13, [5, 6, 7]), "e1") is None
    p.edge_gone("e1")
    p.verified("s1", [5, 6, 7], now=1.0)
    assert p.release_ahead("s1") is None


def pipeline_policy(sessions: int, turnaround_s: float) -> SchedulingPolicy:
    """A pipeline policy that has measured a CPU-like verifier (cost grows with nodes) and
    edges with the given turnaround."""
    p = SchedulingPolicy(max_batch=sessions, strategy="pipeline", budget=32, depth=4)
    p.verifier_seen("v", capacity=sessions, now=0)
    for i in range(sessions):
        p.edge_seen(f"e{i}", capacity=1, now=0)
        opened(p, f"s{i}", 10)
        p.timings[f"e{i}"] = timing = EdgeTiming()
        for _ in range(5):
            timing.add(turnaround_s, 0.01, 4)
    for nodes in (33, 66, 99, 132, 33, 66):
        p.verify_timed("v", nodes, 0.006 + 0.0002 * nodes)
    return p


def test_the_pipeline_keeps_full_trees_while_the_verifier_has_time_to_spare():
    idle = pipeline_policy(sessions=4, turnaround_s=0.03)  # edges take about as long as the verifier
    assert idle.groups("v") == 1  # one batch: more groups would buy a little shorter cycle with more passes
    assert idle.shape_for("s0")[0] == 32
    quick = pipeline_policy(sessions=4, turnaround_s=0.02)
    assert quick.groups("v") == 2  # two groups shorten the cycle by over a third: worth their passes
    assert quick.shape_for("s0")[0] < 32  # and then the verifier is busy nearly all the time
    busy = pipeline_policy(sessions=16, turnaround_s=0.001)  # edges answer at once: verifier-bound
    assert busy.shape_for("s0")[0] < 32


def test_an_idle_verifier_waits_half_a_verification_for_a_late_draft_not_more():
    p = pipeline_policy(sessions=4, turnaround_s=0.03)
    assert p.groups("v") == 1
    for sid in ("s0", "s1", "s2"):  # three drafts in on time; s3's is due any moment
        assert p.draft_arrived(tree(sid), p.sessions[sid].edge, now=0.03) is None
    pass_s = 0.006 + 0.0002 * 4 * 33  # one verification of the whole group
    assert p.next_batch("v", now=0.03) == []  # worth a short wait: one pass instead of two
    assert p.next_batch("v", now=0.03 + 0.4 * pass_s) == []
    batch = p.next_batch("v", now=0.03 + 0.6 * pass_s)  # the ready trees do not wait out a pass
    assert sorted(t.session_id for t in batch) == ["s0", "s1", "s2"]


def test_server_side_drafters_sessions_are_verified_together_under_every_strategy():
    for strategy in ("fifo", "two-groups", "pipeline"):
        p = SchedulingPolicy(max_batch=4, strategy=strategy)
        p.verifier_seen("v", capacity=4, now=0)
        p.edge_seen("server", capacity=4, now=0, pool="server")
        for i in range(3):
            opened(p, f"s{i}", 10, mode="server-only")
            p.sessions[f"s{i}"].group = i % 2
        for i in range(3):
            assert p.draft_arrived(tree(f"s{i}"), "server") is None
        assert sorted(t.session_id for t in p.next_batch("v", now=0)) == ["s0", "s1", "s2"], strategy
