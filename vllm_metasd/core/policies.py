"""Bandit policies over drafters: one bandit state per request, rewards in [0, 1].

Interface (the proposer calls exactly this)::

    state = policy.new_state(prior)      # a request's first step
    arm = policy.select(state)           # every step
    policy.update(state, arm, reward)    # once that arm's draft is verified

States hold plain Python lists, not numpy arrays: for a handful of arms list
arithmetic is several times faster than numpy's per-call overhead, and
selection runs for every request at every engine step. Measured on this
project's 2-core CPU machine, 6 arms, select + update per round (budget 20 us):
UCB ~3.5 us, sliding-window UCB ~4 us, epsilon-greedy ~3.5 us, discounted UCB
~5 us, EXP3 ~7 us, fixed ~0.3 us (``benchmark()`` below re-measures;
tests/test_policies.py enforces the budget).

Randomness: each state owns a ``numpy.random.Generator`` seeded from
(policy seed, state seed); the store passes a creation counter as state seed,
so a run is reproducible and every tensor-parallel rank makes the same choices.
It is created on first use (~25 us), so deterministic policies never pay for it.
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import inspect
import math
import numbers
from typing import ClassVar

import numpy as np


@dataclasses.dataclass(slots=True)
class ArmPrior:
    """Warm start: per-arm mean reward and how many pseudo-observations each is
    worth (0 = nothing known about that arm; it is explored as usual)."""

    means: list[float]
    counts: list[float]


@dataclasses.dataclass(slots=True)
class BanditState:
    counts: list[float]  # pulls per arm as the policy weighs them (prior, discount, window)
    sums: list[float]  # matching reward sums
    seed: tuple[int, int]  # (policy seed, state seed)
    t: int = 0  # rounds played (updates)
    weights: list[float] | None = None  # EXP3 log-weights, max kept at 0
    probs: list[float] | None = None  # EXP3 distribution of the last select
    window: collections.deque | None = None  # sliding window of (arm, reward)
    prior: ArmPrior | None = None  # sliding-window UCB drops it once the window is full
    _rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng


class ParamError(ValueError):
    """An invalid policy parameter; ``param`` names it (the config reports it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def check_param(name: str, value, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, integer: bool = False):
    """Validate one policy parameter; the ValueError says what is allowed."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ParamError(name, f"{name} must be {'an integer' if integer else 'a number'}, "
                               f"got {value!r}")
    if not integer and not _finite(value):
        raise ParamError(name, f"{name} must be a finite number, got {value!r:.40}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        allowed = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low}" if low is not None
            else f"{'<' if high_open else '<='} {high}")
        raise ParamError(name, f"{name} must be {allowed}, got {value!r}")
    return value


class Policy(abc.ABC):
    name: ClassVar[str]

    def __init__(self, num_arms: int, *, seed: int = 0):
        check_param("num_arms", num_arms, low=1, integer=True)
        check_param("seed", seed, low=0, integer=True)
        self.num_arms = num_arms
        self.seed = seed

    def new_state(self, prior: ArmPrior | None = None, state_seed: int = 0) -> BanditState:
        n = self.num_arms
        state = BanditState([0.0] * n, [0.0] * n, (self.seed, state_seed))
        if prior is not None:
            state.counts = [float(c) for c in prior.counts]
            state.sums = [m * c for m, c in zip(prior.means, prior.counts)]
            state.prior = prior
        return state

    @abc.abstractmethod
    def select(self, state: BanditState) -> int: ...

    def update(self, state: BanditState, arm: int, reward: float) -> None:
        state.t += 1
        state.counts[arm] += 1.0
        state.sums[arm] += reward


def _untried(counts: list[float]) -> int:
    """First arm with no (weighted) pulls, else -1."""
    for arm, c in enumerate(counts):
        if c <= 0.0:
            return arm
    return -1


class UCBPolicy(Policy):
    """MetaSD-UCB: each untried arm once, in index order; then
    ``argmax_i mean_i + sqrt(beta * ln t / n_i)``. Ties go to the lowest index
    (deterministic, and arms are listed in the user's order of preference).
    The paper's regret bound needs beta > 0.5; UCB1 is beta = 2."""

    name = "ucb"

    def __init__(self, num_arms: int, beta: float = 1.0, *, seed: int = 0):
        super().__init__(num_arms, seed=seed)
        self.beta = check_param("beta", beta, low=0, low_open=True)

    def select(self, state: BanditState) -> int:
        counts = state.counts
        arm = _untried(counts)
        if arm >= 0:
            return arm
        # t = total (weighted) pulls; >= 1 keeps the log non-negative when
        # discounting or a fractional prior leaves less than one pull in total.
        scale = self.beta * math.log(max(sum(counts), 1.0))
        best, best_v = 0, -math.inf
        for arm, (s, c) in enumerate(zip(state.sums, counts)):
            v = s / c + math.sqrt(scale / c)
            if v > best_v:
                best, best_v = arm, v
        return best


class DiscountedUCBPolicy(UCBPolicy):
    """Discounted UCB (Garivier & Moulines 2011): every round all counts and
    sums fade by gamma, so the estimate follows a drafter whose alignment
    changes inside a request (the effective memory is ~1/(1-gamma) rounds).
    The index is UCB's with discounted counts, t = their sum."""

    name = "discounted_ucb"

    def __init__(self, num_arms: int, beta: float = 1.0, gamma: float = 0.95, *,
                 seed: int = 0):
        super().__init__(num_arms, beta, seed=seed)
        self.gamma = check_param("gamma", gamma, low=0, high=1, low_open=True)

    def update(self, state: BanditState, arm: int, reward: float) -> None:
        g = self.gamma
        state.counts = [c * g for c in state.counts]
        state.sums = [s * g for s in state.sums]
        super().update(state, arm, reward)


class SlidingWindowUCBPolicy(UCBPolicy):
    """UCB on the last ``window`` rounds only (Garivier & Moulines 2011); an arm
    with no pull inside the window counts as untried and is tried again."""

    name = "sliding_window_ucb"

    def __init__(self, num_arms: int, beta: float = 1.0, window: int = 50, *, seed: int = 0):
        super().__init__(num_arms, beta, seed=seed)
        self.window = check_param("window", window, low=1, integer=True)

    def new_state(self, prior: ArmPrior | None = None, state_seed: int = 0) -> BanditState:
        state = super().new_state(prior, state_seed)
        state.window = collections.deque()
        return state

    def update(self, state: BanditState, arm: int, reward: float) -> None:
        super().update(state, arm, reward)
        window = state.window
        window.append((arm, reward))
        if len(window) > self.window:
            old_arm, old_reward = window.popleft()
            state.counts[old_arm] -= 1.0
            state.sums[old_arm] -= old_reward
        if state.prior is not None and state.t >= self.window:
            # The prior is as old as the window now: recount from real pulls
            # only (exact, once per request, instead of subtracting floats).
            state.prior = None
            state.counts = [0.0] * self.num_arms
            state.sums = [0.0] * self.num_arms
            for a, r in window:
                state.counts[a] += 1.0
                state.sums[a] += r


class EXP3Policy(Policy):
    """EXP3 (Auer, Cesa-Bianchi, Freund & Schapire 2002): sample from
    ``(1 - gamma) * softmax(log_w) + gamma / K``; the chosen arm's log-weight
    grows by ``eta * r / p_arm`` (importance-weighted, so unbiased for every
    arm). eta defaults to gamma / K as in classic EXP3. Log-weights are
    shifted so their max is 0 after every update: no overflow however long
    a request runs.

    ``alpha`` > 0 adds EXP3.S weight sharing (same paper): each round
    every arm receives e * alpha / K of the total weight, which bounds how far
    a neglected arm can fall behind, so the policy tracks a best arm that
    changes (a request switching task) within tens of rounds instead of as
    many rounds as the old arm led. alpha = 0 (default) is classic EXP3.
    """

    name = "exp3"

    def __init__(self, num_arms: int, gamma: float = 0.1, eta: float | None = None,
                 alpha: float = 0.0, *, seed: int = 0):
        super().__init__(num_arms, seed=seed)
        self.gamma = check_param("gamma", gamma, low=0, high=1, low_open=True)
        self.eta = gamma / num_arms if eta is None else check_param(
            "eta", eta, low=0, low_open=True)
        self.alpha = check_param("alpha", alpha, low=0, high=1)

    def new_state(self, prior: ArmPrior | None = None, state_seed: int = 0) -> BanditState:
        state = super().new_state(None, state_seed)  # counts/sums: real pulls only
        state.weights = [0.0] * self.num_arms
        if prior is not None:
            # A prior mean m worth c rounds ~ c rounds of estimates averaging m.
            w = [self.eta * m * c for m, c in zip(prior.means, prior.counts)]
            top = max(w)
            state.weights = [x - top for x in w]
        return state

    def _distribution(self, weights: list[float]) -> list[float]:
        w = [math.exp(x) for x in weights]  # max log-weight is 0: no overflow
        norm = (1.0 - self.gamma) / sum(w)
        explore = self.gamma / self.num_arms
        return [x * norm + explore for x in w]

    def select(self, state: BanditState) -> int:
        state.probs = probs = self._distribution(state.weights)
        u, acc = state.rng.random(), 0.0
        for arm, p in enumerate(probs):
            acc += p
            if u < acc:
                return arm
        return self.num_arms - 1  # u within rounding of 1.0

    def update(self, state: BanditState, arm: int, reward: float) -> None:
        super().update(state, arm, reward)
        p = (state.probs or self._distribution(state.weights))[arm]
        state.probs = None
        old = state.weights  # max 0
        new = list(old)
        new[arm] += self.eta * reward / p
        share = math.e * self.alpha / self.num_arms * sum(math.exp(x) for x in old)
        if share > 0.0:  # alpha > 0 that does not underflow
            # w_i <- w_i * exp(eta * r_i / p_i) + (e * alpha / K) * sum_j w_j(old), in log space.
            log_share = math.log(share)
            new = [_logaddexp(x, log_share) for x in new]
        top = max(new)
        state.weights = [x - top for x in new]


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) without overflow or log(0)."""
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


class EpsilonGreedyPolicy(Policy):
    """Baseline: each untried arm once, then the best empirical mean, or with
    probability epsilon a uniformly random arm. Ties go to the lowest index."""

    name = "epsilon_greedy"

    def __init__(self, num_arms: int, epsilon: float = 0.1, *, seed: int = 0):
        super().__init__(num_arms, seed=seed)
        self.epsilon = check_param("epsilon", epsilon, low=0, high=1)

    def select(self, state: BanditState) -> int:
        arm = _untried(state.counts)
        if arm >= 0:
            return arm
        if self.epsilon > 0.0:
            rng = state.rng
            if rng.random() < self.epsilon:
                # random() * K, not integers(K): 0.7 us instead of 4.5 us.
                return min(int(rng.random() * self.num_arms), self.num_arms - 1)
        best, best_v = 0, -math.inf
        for arm, (s, c) in enumerate(zip(state.sums, state.counts)):
            if s / c > best_v:
                best, best_v = arm, s / c
        return best


class FixedArmPolicy(Policy):
    """Baseline: always the same drafter (a single-drafter run inside MetaSD)."""

    name = "fixed"

    def __init__(self, num_arms: int, arm: int = 0, *, seed: int = 0):
        super().__init__(num_arms, seed=seed)
        self.arm = check_param("arm", arm, low=0, high=num_arms, high_open=True, integer=True)

    def select(self, state: BanditState) -> int:
        return self.arm


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (UCBPolicy, EXP3Policy, DiscountedUCBPolicy,
                              SlidingWindowUCBPolicy, EpsilonGreedyPolicy, FixedArmPolicy)
}


def policy_class(name: str) -> type[Policy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}") from None


def policy_params(name: str) -> list[str]:
    """The tunable parameters of a policy (its constructor's, minus num_arms/seed)."""
    sig = inspect.signature(policy_class(name).__init__)
    return [p for p in sig.parameters if p not in ("self", "num_arms", "seed")]


def make_policy(name: str, num_arms: int, seed: int = 0, **params) -> Policy:
    """Build a policy by name; unknown names or parameters raise ValueError."""
    cls = policy_class(name)
    unknown = sorted(set(params) - set(policy_params(name)))
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter(s) {unknown}; its parameters "
                         f"are: {', '.join(policy_params(name)) or 'none'}")
    return cls(num_arms, seed=seed, **params)


def benchmark(num_arms: int = 6, rounds: int = 20_000) -> dict[str, float]:
    """Microseconds per select + update, per policy."""
    import time

    out = {}
    for name in POLICIES:
        policy = make_policy(name, num_arms, seed=0)
        state = policy.new_state()
        rewards = np.random.default_rng(0).random(rounds).tolist()
        t0 = time.perf_counter()
        for r in rewards:
            policy.update(state, policy.select(state), r)
        out[name] = (time.perf_counter() - t0) / rounds * 1e6
    return out

