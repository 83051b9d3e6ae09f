"""Per-request state store (no vLLM)."""
import gc
import math
import tracemalloc

import numpy as np
import pytest

from vllm_metasd.core import EXP3Policy, RequestStateStore, UCBPolicy


def churn(store, n, prefix):
    """n requests, each created, stepped once and finished."""
    for i in range(n):
        rid = f"{prefix}{i}"
        state = store.get_or_create(rid)
        store.record(state, store.choose(state), drafted=4, accepted=2, reward=0.5)
        assert store.free(rid) is state


@pytest.mark.parametrize("policy,warm_start,n", [
    (UCBPolicy(4), False, 100_000),
    (EXP3Policy(4), True, 10_000),  # rng + prior paths; tracemalloc makes these slow
])
def test_created_and_finished_requests_leave_nothing_behind(policy, warm_start, n):
    store = RequestStateStore(policy, warm_start=warm_start)
    churn(store, 1000, "warmup-")  # allocator, interned names, the prior
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    churn(store, n, "req-")
    gc.collect()
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(store) == 0 and not store._states
    assert growth < 64 * 1024  # bytes; one leaked state per request would be > 5 MB
    assert sum(store.totals.chosen) == n + 1000


def test_get_or_create_get_contains_len_free():
    store = RequestStateStore(UCBPolicy(2))
    assert store.get("a") is None and "a" not in store and len(store) == 0
    a = store.get_or_create("a")
    assert store.get_or_create("a") is a and store.get("a") is a and "a" in store
    store.get_or_create("b")
    assert len(store) == 2
    assert store.free("a") is a and store.free("a") is None and len(store) == 1


def test_states_get_distinct_deterministic_seeds():
    s1, s2 = RequestStateStore(EXP3Policy(3, seed=5)), RequestStateStore(EXP3Policy(3, seed=5))
    a, b = s1.get_or_create("x"), s1.get_or_create("y")
    assert a.bandit.seed != b.bandit.seed
    assert s2.get_or_create("x").bandit.seed == a.bandit.seed


def test_free_missing_frees_only_dead_requests():
    store = RequestStateStore(UCBPolicy(2))
    for rid in "abcd":
        store.get_or_create(rid)
    assert sorted(store.free_missing({"b", "d", "zzz"})) == ["a", "c"]
    assert sorted(store.snapshot()["live_request_ids"]) == ["b", "d"]


def test_record_updates_bandit_and_stats_but_skips_nan():
    store = RequestStateStore(UCBPolicy(2), ["a", "b"])
    s = store.get_or_create("r")
    assert store.choose(s) == 0 and s.last_arm == 0
    store.record(s, 1, drafted=4, accepted=3, reward=0.75)
    store.record(s, 1, drafted=0, accepted=0, reward=math.nan)
    store.record(s, 1, drafted=2, accepted=2, reward=1.0000001)  # float noise: clamped
    assert s.bandit.counts == [0.0, 2.0] and s.bandit.sums == pytest.approx([0.0, 1.75])
    assert s.stats.drafted == [0, 6] and s.stats.accepted == [0, 5]
    assert s.stats.chosen == [1, 0]
    snap = store.snapshot()
    assert snap["live_requests"] == 1
    b = snap["drafters"]["b"]
    assert (b["drafted"], b["accepted"], b["reward_count"]) == (6, 5, 2)
    assert b["acceptance_rate"] == pytest.approx(5 / 6) and b["mean_reward"] == pytest.approx(0.875)
    store.reset_stats()
    assert store.snapshot()["drafters"]["b"]["drafted"] == 0


def test_warm_start_prior_skips_blind_exploration():
    store = RequestStateStore(UCBPolicy(3), warm_start=True, prior_pseudo_count=5)
    for i in range(20):
        s = store.get_or_create(f"r{i}")
        for arm, r in enumerate([0.2, 0.9, 0.1]):
            store.record(s, arm, 4, 0, r)
        store.free(f"r{i}")
    assert store.priors.prior(None, 5).bandit.means == pytest.approx([0.2, 0.9, 0.1])
    fresh = store.get_or_create("new")
    assert fresh.bandit.counts == [5.0, 5.0, 5.0]
    assert store.choose(fresh) == 1  # the prior's best arm, not arm 0 first
    cold = RequestStateStore(UCBPolicy(3)).get_or_create("x")  # warm start off
    assert UCBPolicy(3).select(cold.bandit) == 0


def test_warm_start_prior_uses_real_rewards_not_its_own_pseudo_counts():
    store = RequestStateStore(UCBPolicy(2), warm_start=True, prior_pseudo_count=100)
    s = store.get_or_create("a")
    store.record(s, 0, 4, 4, 1.0)
    store.free("a")
    s = store.get_or_create("b")  # starts from prior mean 1.0 for arm 0 (worth 100 pulls)
    store.record(s, 0, 4, 0, 0.0)
    store.free("b")
    assert store.priors.prior(None, 100).bandit.means[0] == pytest.approx(0.5)  # (1 + 0) / 2


def test_warm_start_seeds_token_estimates_from_real_gains_only():
    store = RequestStateStore(UCBPolicy(2), warm_start=True, prior_pseudo_count=2)
    s = store.get_or_create("a")
    for gain in (3.0, 1.0):  # arm 0: 2 tokens beyond the target's per step; arm 1 unseen
        s.observe_gain(0, gain)
    store.free("a")
    b = store.get_or_create("b")
    assert b.gain_sum.tolist() == [4.0, 0.0] and b.gain_count.tolist() == [2.0, 0.0]
    b.observe_gain(0, 0.0)  # its own evidence: 0; the prior's pseudo-observations left out
    assert b.mean_gains()[0] == 0.0 and np.isnan(b.mean_gains()[1])
    store.free("b")
    assert store.priors.prior(None, 2).gains[0] == pytest.approx(1.0)  # (2 + 0) / 2 requests
    cold = RequestStateStore(UCBPolicy(2)).get_or_create("x")
    assert cold.gain_count.tolist() == [0.0, 0.0]


def test_arm_names_must_match_arms():
    with pytest.raises(ValueError, match="3 arm names for 2 arms"):
        RequestStateStore(UCBPolicy(2), ["a", "b", "c"])
