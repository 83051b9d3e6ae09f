"""The step controller's rules, without vLLM (milliseconds)."""
import math

import numpy as np
import pytest

from vllm_metasd.core import (
    MAX_ARM_FAILURES, RequestStateStore, StepController, make_policy,
)


def controller(policy="fixed", arms=3, **params):
    return StepController(RequestStateStore(make_policy(policy, arms, **params)))


def rows(*r):
    return np.array(r, dtype=np.int64)


def test_choice_per_active_row_only():
    c = controller("fixed", arm=1)
    arms = c.choose(["a", "b", "c"], np.array([True, False, True]))
    assert arms.tolist() == [1, -1, 1]
    assert len(c.store) == 2 and c.store.get("b") is None


def test_empty_draft_earns_zero_and_awaits_no_verification():
    c = controller("fixed", arm=0)
    c.choose(["a", "b"], np.array([True, True]))
    c.drafted(0, rows(0, 1), np.array([0, 3]))
    a, b = c.store.get("a"), c.store.get("b")
    assert a.last_arm is None and a.stats.reward_count[0] == 1 and a.stats.reward_sum[0] == 0
    assert b.last_arm == 0 and b.stats.reward_count[0] == 0
    # Verification then rewards b only (a drafted nothing).
    c.observe(["a", "b"], [0, 3], [0, 2], [math.nan, 0.9])
    assert b.stats.reward_sum[0] == pytest.approx(0.9) and a.stats.reward_count[0] == 1


def test_failures_disable_an_arm_after_the_limit_and_its_kv_is_forgotten():
    c = controller("fixed", arm=2)
    for i in range(MAX_ARM_FAILURES):
        c.choose(["a"], np.array([True]))
        c.mark_caught_up(2, rows(0), np.array([10]))
        c.failed(2, rows(0), "bad", RuntimeError("x"))
        state = c.store.get("a")
        assert 2 not in state.computed and state.last_arm is None
        assert c.disabled[2] == (i == MAX_ARM_FAILURES - 1)
    assert c.total_failures[2] == MAX_ARM_FAILURES
    # A disabled arm earns 0 and the policy chooses again; "fixed" keeps
    # choosing it, so the row gets no speculation.
    assert c.choose(["a"], np.array([True])).tolist() == [-1]


def test_a_success_resets_the_consecutive_failure_count():
    c = controller("fixed", arm=0)
    c.choose(["a"], np.array([True]))
    c.failed(0, rows(0), "x", RuntimeError("x"))
    c.failed(0, rows(0), "x", RuntimeError("x"))
    c.drafted(0, rows(0), np.array([2]))
    assert c.failures[0] == 0 and not c.disabled[0]


def test_disabled_arm_makes_ucb_choose_another():
    c = controller("ucb", arms=2, beta=1.0)
    c.disabled[0] = True
    for _ in range(5):
        assert c.choose(["a"], np.array([True])).tolist() == [1]


def test_catch_up_positions_live_in_the_ledger():
    c = controller("fixed", arm=0)
    c.choose(["a", "b"], np.array([True, True]))
    assert c.caught_up(0, rows(0, 1)).tolist() == [0, 0]
    c.mark_caught_up(0, rows(0, 1), np.array([7, 9]))
    assert c.caught_up(0, rows(1, 0)).tolist() == [9, 7]
    assert c.caught_up(1, rows(0)).tolist() == [0]  # another arm: nothing yet


def test_preemption_drops_the_pending_choice_and_kv_keeps_the_bandit():
    c = controller("fixed", arm=0)
    c.choose(["a"], np.array([True]))
    c.mark_caught_up(0, rows(0), np.array([12]))
    c.preempted_request("a")
    state = c.store.get("a")
    assert state.last_arm is None and state.computed == {} and state.stats.chosen[0] == 1
    c.observe(["a"], [3], [3], [1.0])  # its draft is never verified: no reward
    assert state.stats.reward_count[0] == 0 and c.preempted == 1


def test_restart_and_finish():
    c = controller("fixed", arm=0)
    c.choose(["a"], np.array([True]))
    c.mark_caught_up(0, rows(0), np.array([5]))
    c.restarted("a")
    assert c.store.get("a").computed == {}
    c.finished("a")
    c.finished("a")  # idempotent (finish after abort)
    assert len(c.store) == 0


def test_an_unmeasured_arm_is_priced_like_the_measured_arms_of_its_kind():
    store = RequestStateStore(make_policy("ucb", 4))
    c = StepController(store, objective="throughput", free_arms=[False, False, False, True])
    c.observe_group_time(0, 1, 2e-3)
    c.observe_group_time(2, 1, 4e-3)
    fits = np.stack([c.costs().arm_fixed, c.costs().arm_per_row], 1)
    measured = np.array([c.arm_cost[0].fit(), c.arm_cost[2].fit()])
    assert fits[[0, 2]] == pytest.approx(measured)
    assert fits[1] == pytest.approx(measured.mean(0))  # the draft LMs' mean
    assert fits[3].tolist() == [0.0, 0.0]  # no free arm measured yet
    c.observe_group_time(3, 1, 1e-5)
    assert c.costs().arm_fixed[3] + c.costs().arm_per_row[3] == pytest.approx(1e-5)
    assert c.costs().arm_fixed[1] == pytest.approx(measured[:, 0].mean())
