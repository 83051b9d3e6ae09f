"""The throughput objective: arms chosen by expected tokens per second (no vLLM)."""
import numpy as np
import pytest

from vllm_metasd.core import RequestStateStore, StepController, make_policy
from vllm_metasd.core.objective import LinearCost, StepCosts, choose_by_throughput, probe_accepted

K = 4


def expected_tokens(alpha: np.ndarray, k: int) -> np.ndarray:
    """Tokens a step yields with k drafts of i.i.d. per-token acceptance alpha
    (the SD bound), to state the choices below in acceptance rates."""
    a = np.clip(alpha, 0.0, 0.999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def costs(target_fixed=4e-3, per_token=0.0, arm_fixed=(0.0, 0.0), arm_per_row=(0.0, 0.0)):
    return StepCosts(target_fixed, per_token, np.array(arm_fixed, float),
                     np.array(arm_per_row, float))


def test_probe_estimate_is_the_run_of_hits_a_draft_would_have_had_accepted():
    hits = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1], bool)
    row = np.array([0] * 6 + [1] * 4 + [2] * 4 + [3])
    got = probe_accepted(hits, row, 5, K)
    # row 0: the drafts from its first 3 positions have 4 hits ahead (its last
    # 3 are cut short by its end and not counted); row 1: one full position, a
    # miss; row 2: one full position, 3 hits then a miss; row 3: no full
    # position, its one cut-short run; row 4: no positions
    assert got[:4].tolist() == [4.0, 0.0, 3.0, 1.0] and np.isnan(got[4])
    # hits in runs: at a hit rate of 0.5 the i.i.d. bound says (1 - 0.5^5) / 0.5 - 1
    # = 0.94 drafted tokens accepted; the 13 full drafts here have 20
    assert probe_accepted(np.array([1, 1, 1, 1, 0, 0, 0, 0] * 2, bool), np.zeros(16, int), 1,
                          K)[0] == pytest.approx((4 + 3 + 2 + 1) * 2 / 13)


def test_cheap_arm_with_lower_acceptance_wins_when_faster():
    # Arm 0: a draft LM, alpha .8 (3.36 tokens/step) for 4 ms of drafting;
    # arm 1: n-gram, alpha .5 (1.94 tokens/step) for free. Target step 4 ms:
    # LM 3.36 / 8 ms = 420 tok/s < n-gram 1.94 / 4 ms = 484 tok/s.
    tokens = expected_tokens(np.array([[0.8, 0.5]]), K)
    choice = choose_by_throughput(tokens, np.zeros((1, 2)), costs(arm_fixed=(4e-3, 0.0)), K)
    assert choice.tolist() == [1]
    # A cheaper LM (1 ms): 3.36 / 5 ms = 672 tok/s beats the n-gram.
    choice = choose_by_throughput(tokens, np.zeros((1, 2)), costs(arm_fixed=(1e-3, 0.0)), K)
    assert choice.tolist() == [0]


def test_no_draft_when_verification_costs_more_than_drafts_yield():
    # Compute-bound target (large batch): each verified token costs as much as
    # a step's fixed part. Drafting 4 tokens at alpha .3 cannot pay.
    tokens = expected_tokens(np.full((8, 2), 0.3), K)
    c = costs(target_fixed=1e-3, per_token=1e-3, arm_fixed=(2e-3, 0.0), arm_per_row=(1e-4, 0.0))
    assert (choose_by_throughput(tokens, np.zeros((8, 2)), c, K) == -1).all()


def test_opening_a_second_group_must_pay_for_itself():
    # 8 rows: arm 0 is the best for all (alpha .8), arm 1 slightly better for
    # half of them (.82). Its own forward costs 3 ms: not worth a second group.
    alpha = np.full((8, 2), [0.8, 0.7])
    alpha[:4, 1] = 0.82
    tokens = expected_tokens(alpha, K)
    c = costs(arm_fixed=(3e-3, 3e-3), arm_per_row=(1e-5, 1e-5))
    assert set(choose_by_throughput(tokens, np.zeros((8, 2)), c, K).tolist()) == {0}
    # Two specialists, each far better on its half of the batch: both groups pay.
    alpha = np.array([[0.1, 0.99]] * 4 + [[0.99, 0.1]] * 4)
    tokens = expected_tokens(alpha, K)
    assert choose_by_throughput(tokens, np.zeros((8, 2)), c, K).tolist() == [1] * 4 + [0] * 4


def test_a_single_row_takes_the_option_with_the_highest_step_rate():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens = 1.0 + rng.random((1, 3)) * K
        catch_up = rng.random((1, 3)) * 2e-3 * (rng.random((1, 3)) < 0.3)
        c = costs(target_fixed=rng.random() * 8e-3 + 1e-4, per_token=rng.random() * 1e-3,
                  arm_fixed=rng.random(3) * 4e-3, arm_per_row=rng.random(3) * 1e-3)
        c.arm_fixed, c.arm_per_row = np.append(c.arm_fixed[:2], 0.0), np.append(
            c.arm_per_row[:2], 0.0)
        plain_s = c.target_fixed + c.target_per_token
        step_s = plain_s + c.target_per_token * K + c.arm_per_row + catch_up[0] + c.arm_fixed
        rates = np.append(tokens[0] / step_s, 1.0 / plain_s)  # the last: no draft
        pick = choose_by_throughput(tokens, catch_up, c, K)[0]
        assert rates[pick] == pytest.approx(rates.max())


def test_catch_up_cost_keeps_rows_where_their_kv_is():
    tokens = expected_tokens(np.array([[0.8, 0.81]]), K)
    catch_up = np.array([[0.0, 5e-3]])  # arm 1 would first process 300 missed tokens
    assert choose_by_throughput(tokens, catch_up, costs(arm_fixed=(1e-3, 1e-3)), K).tolist() == [0]


def test_linear_cost_recovers_fixed_and_slope():
    c = LinearCost()
    assert not c.seen
    for n in (1, 4, 16, 64) * 5:
        c.add(n, 2e-3 + 1e-4 * n)
    fixed, slope = c.fit()
    assert fixed == pytest.approx(2e-3, rel=1e-3) and slope == pytest.approx(1e-4, rel=1e-3)


def test_linear_cost_with_no_slope_is_all_fixed_and_one_size_is_split_evenly():
    # several sizes at one time: verifying more tokens costs nothing more (not
    # half the step per token, as when only one size has been seen)
    c = LinearCost()
    for n in (1, 5) * 10:
        c.add(n, 3e-3)
    assert c.fit() == pytest.approx((3e-3, 0.0))
    one = LinearCost()
    one.add(4, 2e-3)
    assert one.fit() == pytest.approx((1e-3, 2.5e-4))


def test_controller_switches_to_throughput_once_costs_are_measured():
    store = RequestStateStore(make_policy("ucb", 2, beta=1.0))
    ctl = StepController(store, k=K, objective="throughput", free_arms=[False, True])
    seq = np.array([100, 100])
    first = ctl.choose(["a", "b"], np.array([True, True]), seq)  # no costs yet: the policy
    assert (first >= 0).all()
    ctl.observe_step_time(10, 4e-3)
    ctl.observe_group_time(0, 2, 4e-3)  # the LM: as costly as the target step
    ctl.observe_group_time(1, 2, 1e-5)
    for req in ("a", "b"):  # the LM's drafts yield a little more than the n-gram's
        s = store.get(req)
        s.gain_sum[:], s.gain_count[:] = [120.0, 100.0], [100, 100]
    assert ctl.choose(["a", "b"], np.array([True, True]), seq).tolist() == [1, 1]
    assert store.get("a").last_arm == 1 and store.totals.chosen[1] >= 2


def test_full_information_updates_estimates_not_drafter_statistics():
    store = RequestStateStore(make_policy("ucb", 2, beta=1.0))
    ctl = StepController(store, k=K, free_arms=[False, True])
    ctl.choose(["a"], np.array([True]))
    store.get("a").last_arm = 0
    ctl.full_information(1, ["a", "gone"], [0.75, 1.0], [3, 4], [4, 4])
    s = store.get("a")
    assert s.stats.reward_count[1] == 1 and s.stats.reward_sum[1] == 0.75
    assert s.gain_sum[1] == 3 and s.gain_count[1] == 1
    assert store.totals.reward_count[1] == 0 and s.stats.drafted[1] == 0


def test_a_free_arm_is_offered_only_where_it_proposes_and_valued_at_what_it_then_yields():
    # Arm 0 a draft LM (1 token a step beyond the target's), arm 1 the
    # n-gram lookup: 3 tokens a step when it finds a match, none on the other
    # half of the steps. Drafting with the LM costs as much as the target step.
    store = RequestStateStore(make_policy("ucb", 2, beta=1e-6))
    ctl = StepController(store, k=K, objective="throughput", free_arms=[False, True], beta=1e-6)
    seq, one = np.array([50]), np.array([True])
    ctl.choose(["a"], one, seq)
    ctl.observe_step_time(1, 4e-3)
    ctl.observe_step_time(5, 4.4e-3)
    ctl.observe_group_time(0, 1, 4e-3)
    ctl.observe_group_time(1, 1, 1e-5)
    s = store.get("a")
    s.gain_sum[0], s.gain_count[0] = 10.0, 10
    for step in range(10):  # its would-be drafts: a match every other step
        matched = 3 if step % 2 == 0 else 0
        ctl.full_information(1, ["a"], [0.75 if matched else 0.0], [matched],
                             [K if matched else 0])
    # Empty drafts are no sample of its gain: 3 tokens a step when it proposes
    # (over every step it would be 1.5, and the LM's 2 / 8.4 ms would win).
    assert s.gain_count[1] == 5 and s.gain_sum[1] / s.gain_count[1] == 3.0
    assert s.stats.reward_count[1] == 10  # its bandit still learns every step
    proposes = np.array([[0, K]])
    assert ctl.choose(["a"], one, seq, proposes).tolist() == [1]
    # No proposal this step: the lookup is no option; the LM (2 tokens in
    # 8.4 ms) beats plain decoding (1 in 4 ms)? 238 < 250 tok/s: nothing.
    assert ctl.choose(["a"], one, seq, np.zeros((1, 2), dtype=np.int64)).tolist() == [-1]
    s.gain_sum[0] = 20.0  # an LM worth 3 tokens a step: drafts where the lookup cannot
    assert ctl.choose(["a"], one, seq, np.zeros((1, 2), dtype=np.int64)).tolist() == [0]
    # An empty draft of the chosen lookup settles its bandit, not its estimate
    store.get("a").last_arm = 1
    ctl.begin(["a"], one)
    ctl.drafted(1, np.array([0]), np.array([0]))
    assert s.gain_count[1] == 5 and s.stats.reward_count[1] == 11


def test_throughput_drafts_only_with_the_rows_own_bandit_choice_or_a_free_arm():
    # Arm 1 would yield far more, but row "a"'s bandit prefers arm 0: the step
    # only decides whether "a" drafts with arm 0, a free arm, or nothing. (A
    # pinned arm, policy "fixed", is never second-guessed.)
    store = RequestStateStore(make_policy("ucb", 3, beta=1e-6))
    ctl = StepController(store, k=K, objective="throughput", free_arms=[False, False, True])
    seq = np.array([50])
    ctl.choose(["a"], np.array([True]), seq)
    for arm, reward in ((0, 0.9), (1, 0.1), (2, 0.0)):  # its bandit: arm 0 aligns best
        store.record(store.get("a"), arm, 4, 2, reward)
    ctl.observe_step_time(5, 4e-3)
    for arm in (0, 1):
        ctl.observe_group_time(arm, 1, 1e-3)
    ctl.observe_group_time(2, 1, 1e-6)
    s = store.get("a")
    s.computed.update({0: 50, 1: 50})
    s.gain_sum[:], s.gain_count[:] = [200.0, 400.0, 0.0], [100, 100, 100]
    assert ctl.choose(["a"], np.array([True]), seq).tolist() == [0]
    s.gain_sum[0] = 0.0  # its choice yields nothing: no draft beats it
    assert ctl.choose(["a"], np.array([True]), seq).tolist() == [-1]


def test_a_free_arm_is_valued_at_its_mean_without_an_exploration_bonus():
    # The free arm is scored on every step (full information): its estimate is
    # as good as it gets, and optimism would only overvalue it. Row "a": the LM
    # yields 1 token beyond the target's per step (10 steps seen), the lookup
    # 0.75 (4 steps seen). Modelled step: target 2.4 ms + 1.6 ms to verify k
    # drafts, the LM 1 ms: LM (1 + 1 + its bonus 0.66) / 5 ms = 532 tok/s; the
    # lookup 1.75 / 4 ms = 438 tok/s (with a bonus of 1.04 it would be 698).
    store = RequestStateStore(make_policy("ucb", 2, beta=1e-6))
    ctl = StepController(store, k=K, objective="throughput", free_arms=[False, True],
                         beta=0.1)
    seq = np.array([50])
    ctl.choose(["a"], np.array([True]), seq)
    ctl.observe_step_time(5, 4e-3)
    ctl.observe_group_time(0, 1, 1e-3)
    ctl.observe_group_time(1, 1, 1e-9)
    s = store.get("a")
    s.computed[0] = 50
    s.gain_sum[:], s.gain_count[:] = [10.0, 3.0], [10, 4]
    assert ctl.choose(["a"], np.array([True]), seq).tolist() == [0]
    s.gain_sum[1] = 4.8  # the lookup: 2.2 / 4 ms = 550 tok/s
    assert ctl.choose(["a"], np.array([True]), seq).tolist() == [1]


def test_prompt_probe_seeds_estimates_and_marks_the_kv_filled():
    store = RequestStateStore(make_policy("ucb", 3, beta=0.1))
    ctl = StepController(store, k=K, free_arms=[False, False, True])
    new = ctl.begin(["a", "b", "c"], np.array([True, True, True]))
    assert new.tolist() == [0, 1, 2]
    ctl.probed(0, new, np.array([40, 60, 20]), np.array([2.5, 0.0, 1.0]))
    a, b = store.get("a"), store.get("b")
    assert a.computed == {0: 40} and b.computed == {0: 60}
    assert a.gain_sum[0] == 2.5 and a.gain_count[0] == 1 and b.gain_sum[0] == 0.0
    # before any verification, on the reward scale: accepted drafts per drafted token
    assert a.stats.reward_sum[0] == pytest.approx(2.5 / K)
    # the lookup proposes nothing on b's text: its bandit gets 0, its tokens
    # per step (what it yields when it proposes) no sample
    ctl.probed(2, new, np.array([40, 60, 20]), np.array([3.0, np.nan, 1.0]))
    assert a.gain_sum[2] == 3.0 and a.gain_count[2] == 1
    assert b.gain_count[2] == 0 and b.stats.reward_count[2] == 1 and b.stats.reward_sum[2] == 0
    assert ctl.begin(["a"], np.array([True])).tolist() == []  # not new any more


@pytest.mark.parametrize("prompt_probe", [True, False])
def test_with_the_prompt_probe_a_request_starts_from_its_prompt_not_the_warm_prior(prompt_probe):
    # Finished requests found arm 0 (a generalist) good, on prompts unlike the
    # new request's, whose prompt agrees with arm 1 (a specialist) and not
    # with arm 0.
    store = RequestStateStore(make_policy("ucb", 2, beta=0.1), warm_start=True,
                              prompt_probe=prompt_probe)
    ctl = StepController(store, k=K)
    for i in range(4):
        s = store.get_or_create(f"old{i}", np.arange(30) + i)
        store.record(s, 0, K, 2, 0.5)
        s.observe_gain(0, 2.0)
        ctl.finished(f"old{i}")
    new = ctl.begin(["new"], np.array([True]), lambda _row: np.arange(500, 530))
    assert ctl.to_probe(new).tolist() == [[prompt_probe] * 2]  # no similar prompt tried them
    ctl.probed(0, new, np.array([40]), np.array([0.0]))
    ctl.probed(1, new, np.array([40]), np.array([0.8]))
    s = store.get("new")
    if prompt_probe:  # its own evidence only: one observation per arm
        assert s.gain_count.tolist() == [1.0, 1.0] and s.bandit.counts == [1.0, 1.0]
        assert ctl.choose(["new"], np.array([True])).tolist() == [1]
    else:  # the population's prior (two pseudo-observations) on top
        assert s.gain_count.tolist() == [3.0, 1.0]
