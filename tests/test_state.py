"""Per-request state store and bookkeeping (no vLLM)."""
import math
import tracemalloc

import numpy as np

from vllm_metasd.core import CatchUpTracker, RequestStateStore, UCBPolicy, group_rows_by_arm


def test_100k_requests_created_and_finished_leave_nothing_behind():
    store, tracker = RequestStateStore(UCBPolicy(4)), CatchUpTracker()
    for i in range(1000):  # warm up allocator / interned names
        store.get_or_create(f"w{i}"), store.free(f"w{i}")
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(100_000):
        rid = f"req-{i}"
        state = store.get_or_create(rid)
        arm = store.choose(state)
        store.record(state, arm, drafted=4, accepted=2, reward=0.5)
        tracker.mark_computed(rid, arm, 10)
        assert store.free(rid) is state
        tracker.free(rid)
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(store) == 0 and len(tracker) == 0
    assert growth < 64 * 1024  # bytes: nothing per request survives
    assert sum(store.totals.chosen) == 100_000


def test_record_updates_bandit_and_stats_but_skips_nan():
    store = RequestStateStore(UCBPolicy(2), ["a", "b"])
    s = store.get_or_create("r")
    store.record(s, 1, drafted=4, accepted=3, reward=0.75)
    store.record(s, 1, drafted=0, accepted=0, reward=math.nan)
    assert s.bandit.counts == [0.0, 1.0] and s.bandit.sums == [0.0, 0.75]
    snap = store.snapshot()["drafters"]["b"]
    assert snap["drafted"] == 4 and snap["accepted"] == 3 and snap["mean_reward"] == 0.75


def test_warm_start_prior_skips_blind_exploration():
    store = RequestStateStore(UCBPolicy(3), warm_start=True, prior_pseudo_count=5)
    for i in range(20):
        s = store.get_or_create(f"r{i}")
        for arm, r in enumerate([0.2, 0.9, 0.1]):
            store.record(s, arm, 4, 0, r)
        store.free(f"r{i}")
    fresh = store.get_or_create("new")
    assert store.choose(fresh) == 1  # the prior's best arm, not arm 0 first
    cold = RequestStateStore(UCBPolicy(3)).get_or_create("x")
    assert UCBPolicy(3).select(cold.bandit) == 0


def test_group_rows_by_arm_is_stable_and_skips_negative():
    groups = group_rows_by_arm(np.array([2, 0, -1, 2, 0]), 3)
    assert [g.tolist() for g in groups] == [[1, 4], [], [0, 3]]


def test_catch_up_tracker():
    t = CatchUpTracker()
    assert t.pending("r", 0, 10) == 10
    t.mark_computed("r", 0, 10)
    assert t.pending("r", 0, 13) == 3 and t.pending("r", 1, 13) == 13
    t.invalidate("r", from_pos=7)
    assert t.computed("r", 0) == 7
    t.free("r")
    assert len(t) == 0 and t.computed("r", 0) == 0
