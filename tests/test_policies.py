"""Bandit policies on synthetic Bernoulli arms (no vLLM)."""
import math
import random

import pytest

from vllm_metasd.core import (
    DiscountedUCBPolicy, EXP3Policy, SlidingWindowUCBPolicy, UCBPolicy, make_policy,
)
from vllm_metasd.core.policies import POLICIES


def play(policy, means_at, rounds, seed=0):
    """Run one bandit; means_at(t) gives the arm means at round t."""
    rng = random.Random(seed)
    state = policy.new_state(state_seed=seed)
    picks, regrets = [], []
    for t in range(rounds):
        means = means_at(t)
        arm = policy.select(state)
        policy.update(state, arm, 1.0 if rng.random() < means[arm] else 0.0)
        picks.append(arm)
        regrets.append(max(means) - means[arm])
    return picks, sum(regrets), regrets


def test_ucb_regret_below_the_ucb1_bound_and_sublinear():
    # UCB1 (Auer, Cesa-Bianchi & Fischer 2002, Thm 1) is MetaSD-UCB with beta=2:
    #   E[R_T] <= sum_{i: D_i>0} 8 ln T / D_i + (1 + pi^2/3) sum_i D_i
    means = [0.9, 0.6, 0.4]
    gaps = [max(means) - m for m in means if m < max(means)]
    T = 2000
    bound = sum(8 * math.log(T) / d for d in gaps) + (1 + math.pi ** 2 / 3) * sum(gaps)
    regrets = [play(UCBPolicy(3, seed=s, beta=2.0), lambda t: means, T, seed=s)[1]
               for s in range(5)]
    mean_regret = sum(regrets) / len(regrets)
    assert mean_regret < bound
    # Logarithmic, not linear: 4x the rounds gives far less than 4x the regret.
    short = sum(play(UCBPolicy(3, seed=s, beta=2.0), lambda t: means, 500, seed=s)[1]
                for s in range(5)) / 5
    assert mean_regret / short < 2.5


def test_ucb_tries_every_arm_once_in_index_order_then_breaks_ties_low():
    policy = UCBPolicy(4, beta=1.0)
    state = policy.new_state()
    first = []
    for _ in range(4):
        arm = policy.select(state)
        first.append(arm)
        policy.update(state, arm, 0.5)
    assert first == [0, 1, 2, 3]
    assert policy.select(state) == 0  # all indices equal: lowest arm


def test_exp3_adapts_when_best_arm_changes():
    T, switch = 3000, 1500
    means_at = lambda t: [0.9, 0.2] if t < switch else [0.2, 0.9]
    picks, _, _ = play(EXP3Policy(2, seed=3, gamma=0.1, eta=0.1), means_at, T)
    late = picks[-500:]
    assert late.count(1) / len(late) > 0.7


@pytest.mark.parametrize("make", [lambda: DiscountedUCBPolicy(2, beta=1.0, gamma=0.99),
                                  lambda: SlidingWindowUCBPolicy(2, beta=1.0, window=200)])
def test_non_stationary_ucb_adapts_faster_than_plain_ucb(make):
    # After a long run on arm 0, arm 1 becomes best by a small gap: plain UCB's
    # mean for arm 0 needs thousands of pulls to fall below arm 1's.
    T, switch = 6000, 3000
    means_at = lambda t: [0.9, 0.3] if t < switch else [0.5, 0.7]
    post = lambda p, s: sum(play(p, means_at, T, seed=s)[2][switch:])
    r_ns = sum(post(make(), s) for s in range(3))
    r_ucb = sum(post(UCBPolicy(2, beta=1.0), s) for s in range(3))
    assert r_ns < 0.5 * r_ucb


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_seeded_runs_are_reproducible_and_arms_valid(name):
    kwargs = {"arm": 2} if name == "fixed" else {}
    runs = [play(make_policy(name, 3, seed=7, **kwargs), lambda t: [.5, .6, .7], 300)[0]
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert set(runs[0]) <= {0, 1, 2}


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError, match="ucb"):
        make_policy("thompson", 2)
