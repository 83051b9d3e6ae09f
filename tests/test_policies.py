"""Bandit policies on synthetic Bernoulli arms (no vLLM)."""
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_metasd.core import (
    POLICIES, ArmPrior, DiscountedUCBPolicy, EpsilonGreedyPolicy, EXP3Policy, FixedArmPolicy,
    ParamError, SlidingWindowUCBPolicy, UCBPolicy, make_policy, policy_params,
)
from vllm_metasd.core.policies import benchmark


def play(policy, means_at, rounds, seed=0):
    """One bandit run on Bernoulli arms; means_at(t) gives the arm means at round t.
    Returns the picks and the per-round pseudo-regret max(mean) - mean[arm]."""
    rng = random.Random(seed)
    state = policy.new_state(state_seed=seed)
    picks, regrets = [], []
    for t in range(rounds):
        means = means_at(t)
        arm = policy.select(state)
        policy.update(state, arm, 1.0 if rng.random() < means[arm] else 0.0)
        picks.append(arm)
        regrets.append(max(means) - means[arm])
    return picks, regrets


def zeta(s, n=10_000):
    """Riemann zeta for s > 1: partial sum plus the integral tail n^(1-s)/(s-1)."""
    return sum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1)


def ucb_regret_bound(gaps, beta, T):
    """Auer, Cesa-Bianchi & Fischer (2002), Thm 1, redone for the index
    mean + sqrt(beta ln t / n) (UCB1 is beta = 2):

    - a suboptimal arm i is pulled at round t only if its mean is over-estimated
      by c = sqrt(beta ln t / s), the best arm's under-estimated by c, or
      2c > D_i; the last needs s < 4 beta ln T / D_i^2 pulls, so at most
      l = ceil(4 beta ln T / D_i^2) such rounds;
    - Hoeffding: each of the first two has probability <= exp(-2 s c^2) = t^(-2 beta);
      union over s, s_i < t: sum_t 2 t^2 t^(-2 beta) = 2 zeta(2 beta - 2) (beta > 1.5).

    E[n_i(T)] <= 4 beta ln T / D_i^2 + 1 + 2 zeta(2 beta - 2), and the
    pseudo-regret sum_i D_i E[n_i(T)] is at most the value returned (for
    beta = 2: 8 ln T / D_i + (1 + pi^2/3) D_i, Auer's bound)."""
    assert beta > 1.5
    return sum(4 * beta * math.log(T) / d + (1 + 2 * zeta(2 * beta - 2)) * d for d in gaps)


MEANS = [0.9, 0.6, 0.4]
STATIONARY = lambda t: MEANS  # noqa: E731


def mean_regret(make, T, seeds=range(5)):
    return sum(sum(play(make(s), STATIONARY, T, seed=s)[1]) for s in seeds) / len(seeds)


@pytest.mark.parametrize("beta", [2.0, 3.0])
def test_ucb_regret_below_the_derived_bound_and_sublinear(beta):
    gaps = [max(MEANS) - m for m in MEANS if m < max(MEANS)]
    T = 2000
    bound = ucb_regret_bound(gaps, beta, T)
    regret = mean_regret(lambda s: UCBPolicy(3, beta, seed=s), T)
    assert regret < bound
    # The bound has teeth: choosing uniformly at random exceeds it.
    assert mean_regret(lambda s: EpsilonGreedyPolicy(3, epsilon=1.0, seed=s), T) > bound
    # Logarithmic, not linear: 4x the rounds gives far less than 4x the regret.
    short = mean_regret(lambda s: UCBPolicy(3, beta, seed=s), 500)
    assert regret / short < 2.5


def test_ucb_tries_every_arm_once_in_index_order_then_breaks_ties_low():
    policy = UCBPolicy(4, beta=1.0)
    state = policy.new_state()
    first = []
    for _ in range(4):
        first.append(policy.select(state))
        policy.update(state, first[-1], 0.5)
    assert first == [0, 1, 2, 3]
    assert policy.select(state) == 0  # all indices equal: lowest arm
    policy.update(state, 0, 0.0)  # arm 0 now worse: arms 1..3 tie, lowest wins
    assert policy.select(state) == 1


def test_ucb_index_matches_the_formula():
    policy = UCBPolicy(2, beta=0.5)
    state = policy.new_state()
    for arm, r in [(0, 1.0), (1, 0.0), (1, 1.0), (1, 1.0)]:
        policy.update(state, arm, r)
    # t = 4: arm 0: 1 + sqrt(.5 ln4 / 1) = 1.833; arm 1: 2/3 + sqrt(.5 ln4 / 3) = 1.147
    assert policy.select(state) == 0
    for _ in range(6):
        policy.update(state, 1, 1.0)
    # t = 10: arm 0: 1 + sqrt(.5 ln10) = 2.073; arm 1: 8/9 + sqrt(.5 ln10 / 9) = 1.247
    assert policy.select(state) == 0
    state.sums[0] = 0.0  # arm 0: 0 + 1.073 < arm 1: 1.247
    assert policy.select(state) == 1


def test_exp3_adapts_when_best_arm_changes():
    # Classic EXP3 (gamma = .1, eta = gamma/K): after a switch at round 500 the
    # weights re-converge; in the last 1000 of 3000 rounds the new best arm is
    # sampled near its ceiling 1 - gamma/K = .95 (uniform part included).
    means_at = lambda t: [0.9, 0.2] if t < 500 else [0.2, 0.9]  # noqa: E731
    for seed in range(3):
        picks, _ = play(EXP3Policy(2, gamma=0.1, seed=seed), means_at, 3000, seed)
        assert picks[-1000:].count(1) / 1000 > 0.85


def test_exp3s_weight_sharing_recovers_after_a_long_lead():
    # After 1500 rounds of arm 0 leading, classic EXP3 needs about as long to
    # catch up; EXP3.S (alpha > 0) caps the lead and switches within ~100 rounds.
    means_at = lambda t: [0.9, 0.2] if t < 1500 else [0.2, 0.9]  # noqa: E731
    share = lambda alpha, s: play(EXP3Policy(2, gamma=0.1, alpha=alpha, seed=s),  # noqa: E731
                                  means_at, 3000, s)[0][-1000:].count(1) / 1000
    classic = [share(0.0, s) for s in range(3)]
    shared = [share(1e-3, s) for s in range(3)]
    assert min(shared) > 0.85
    assert sum(shared) > sum(classic) + 0.3 * len(classic)


@pytest.mark.parametrize("make", [lambda: DiscountedUCBPolicy(2, beta=1.0, gamma=0.99),
                                  lambda: SlidingWindowUCBPolicy(2, beta=1.0, window=200)],
                         ids=["discounted", "sliding_window"])
def test_non_stationary_ucb_adapts_faster_than_plain_ucb(make):
    # After a long run on arm 0, arm 1 becomes best by a small gap: plain UCB's
    # mean for arm 0 needs thousands of pulls to fall below arm 1's.
    T, switch = 6000, 3000
    means_at = lambda t: [0.9, 0.3] if t < switch else [0.5, 0.7]  # noqa: E731
    post = lambda p, s: sum(play(p, means_at, T, seed=s)[1][switch:])  # noqa: E731
    r_ns = sum(post(make(), s) for s in range(3))
    r_ucb = sum(post(UCBPolicy(2, beta=1.0), s) for s in range(3))
    assert r_ns < 0.5 * r_ucb


def test_sliding_window_forgets_and_retries_arms():
    policy = SlidingWindowUCBPolicy(2, window=3)
    state = policy.new_state()
    for _ in range(3):
        policy.update(state, 0, 1.0)
    assert state.counts == [3.0, 0.0]
    assert policy.select(state) == 1  # untried inside the window
    policy.update(state, 1, 0.0)
    assert state.counts == [2.0, 1.0] and state.sums == [2.0, 0.0]


def test_discounted_ucb_fades_old_rewards():
    policy = DiscountedUCBPolicy(2, gamma=0.5)
    state = policy.new_state()
    policy.update(state, 0, 1.0)
    policy.update(state, 1, 0.0)
    assert state.counts == pytest.approx([0.5, 1.0]) and state.sums == pytest.approx([0.5, 0.0])


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_seeded_runs_are_reproducible(name):
    means_at = lambda t: [.5, .6, .7]  # noqa: E731
    run = lambda seed: play(make_policy(name, 3, seed=seed), means_at, 300)[0]  # noqa: E731
    assert run(7) == run(7)
    if name in ("exp3", "epsilon_greedy"):  # randomised: the seed must matter
        assert run(7) != run(8)


def test_state_seed_gives_distinct_streams():
    first_draw = lambda seed, state_seed: (  # noqa: E731
        EXP3Policy(4, seed=seed).new_state(state_seed=state_seed).rng.random())
    assert first_draw(1, 0) == first_draw(1, 0)
    assert len({first_draw(1, 0), first_draw(1, 1), first_draw(2, 0)}) == 3


def test_fixed_and_epsilon_zero_are_deterministic():
    fixed = FixedArmPolicy(3, arm=2)
    assert {fixed.select(fixed.new_state()) for _ in range(10)} == {2}
    greedy = EpsilonGreedyPolicy(2, epsilon=0.0)
    picks, _ = play(greedy, lambda t: [0.2, 0.8], 200)
    assert picks[:2] == [0, 1] and picks[-50:] == [1] * 50


def test_make_policy_names_and_errors():
    assert isinstance(make_policy("ucb", 3, 0, beta=2.0), UCBPolicy)
    assert make_policy("exp3", 4, 0).eta == pytest.approx(0.1 / 4)  # classic default
    with pytest.raises(ValueError, match="thompson.*ucb, exp3"):
        make_policy("thompson", 2, 0)
    with pytest.raises(ValueError, match="betta"):
        make_policy("ucb", 2, 0, betta=1.0)
    assert policy_params("discounted_ucb") == ["beta", "gamma"]


@pytest.mark.parametrize("name,params,param", [
    ("ucb", {"beta": 0.0}, "beta"), ("exp3", {"gamma": 1.5}, "gamma"),
    ("exp3", {"eta": -1.0}, "eta"), ("discounted_ucb", {"gamma": 0.0}, "gamma"),
    ("sliding_window_ucb", {"window": 0}, "window"),
    ("sliding_window_ucb", {"window": 2.5}, "window"),
    ("epsilon_greedy", {"epsilon": 1.1}, "epsilon"), ("fixed", {"arm": 3}, "arm"),
    ("ucb", {"beta": True}, "beta"),
])
def test_bad_parameters_name_the_parameter(name, params, param):
    with pytest.raises(ParamError, match=param) as e:
        make_policy(name, 3, 0, **params)
    assert e.value.param == param


def test_select_update_is_cheap():
    # Per request per engine step; the budget is 20 us for 6 arms.
    best = {}
    for _ in range(3):
        for name, us in benchmark(num_arms=6, rounds=3000).items():
            best[name] = min(us, best.get(name, math.inf))
    assert max(best.values()) < 20.0, best


# ---- warm start ------------------------------------------------------------------

def test_ucb_prior_skips_known_arms_but_explores_unknown_ones():
    policy = UCBPolicy(3)
    known = policy.new_state(ArmPrior([0.2, 0.5, 0.9], [5.0, 5.0, 5.0]))
    assert policy.select(known) == 2  # the prior's best, not blind arm 0
    partial = policy.new_state(ArmPrior([0.2, 0.0, 0.9], [5.0, 0.0, 5.0]))
    assert policy.select(partial) == 1  # unknown to the prior: tried first
    assert partial.counts == [5.0, 0.0, 5.0] and partial.sums == pytest.approx([1.0, 0.0, 4.5])


def test_exp3_prior_tilts_the_initial_distribution():
    policy = EXP3Policy(2, gamma=0.1, eta=0.5)
    state = policy.new_state(ArmPrior([0.1, 0.9], [4.0, 4.0]))
    # log-weights eta * m * c = (.2, 1.8), shifted to (-1.6, 0)
    assert state.weights == pytest.approx([-1.6, 0.0])
    p1 = 0.9 / (1 + math.exp(-1.6)) + 0.1 / 2
    assert policy._distribution(state.weights) == pytest.approx([1 - p1, p1])


def test_sliding_window_prior_expires_with_the_window():
    policy = SlidingWindowUCBPolicy(2, window=4)
    state = policy.new_state(ArmPrior([1.0, 0.5], [2.0, 2.0]))
    for _ in range(3):
        policy.update(state, 1, 0.0)
    assert state.counts == [2.0, 5.0]
    policy.update(state, 1, 0.0)  # window full: only real pulls remain
    assert state.counts == [0.0, 4.0] and state.sums == [0.0, 0.0] and state.prior is None


# ---- properties -------------------------------------------------------------------

def policy_kwargs(name, k, draw):
    return {
        "ucb": lambda: {"beta": draw(st.floats(0.01, 10))},
        "exp3": lambda: {"gamma": draw(st.floats(0.01, 1.0)),
                         "eta": draw(st.one_of(st.none(), st.floats(0.01, 50))),
                         "alpha": draw(st.sampled_from([0.0, 1e-3, 0.5]))},
        "discounted_ucb": lambda: {"gamma": draw(st.floats(0.01, 1.0))},
        "sliding_window_ucb": lambda: {"window": draw(st.integers(1, 20))},
        "epsilon_greedy": lambda: {"epsilon": draw(st.floats(0.0, 1.0))},
        "fixed": lambda: {"arm": draw(st.integers(0, k - 1))},
    }[name]()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_policies_always_select_a_valid_arm(data):
    name = data.draw(st.sampled_from(sorted(POLICIES)))
    k = data.draw(st.integers(1, 12))
    policy = make_policy(name, k, data.draw(st.integers(0, 2**32)),
                         **policy_kwargs(name, k, data.draw))
    prior = None
    if data.draw(st.booleans()):
        prior = ArmPrior(data.draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)),
                         data.draw(st.lists(st.sampled_from([0.0, 0.3, 2.0]),
                                            min_size=k, max_size=k)))
    state = policy.new_state(prior, state_seed=data.draw(st.integers(0, 10**6)))
    rewards = data.draw(st.lists(st.floats(0, 1), max_size=60))
    for r in rewards:
        arm = policy.select(state)
        assert isinstance(arm, int) and 0 <= arm < k
        policy.update(state, arm, r)
    assert 0 <= policy.select(state) < k
    assert all(math.isfinite(x) for x in state.sums + state.counts)
