"""Choosing arms by speed: expected tokens per second of the whole step (no vLLM).

The ``throughput`` objective values a step, not a row: its tokens divided by
its time. With E_r(o) the expected tokens row r yields with option o (an arm,
or -1: no draft, 1 token) and the step's time modelled as

    T = target_fixed + target_per_token * sum_r (1 + k [o_r >= 0])     # verification
        + sum_{arms a opened} (arm_fixed[a] + arm_per_row[a] * n_a)    # drafting
        + sum_r catch_up[r, o_r]                                        # switching cost

it maximises sum_r E_r(o_r) / T. That ratio is solved the Dinkelbach way:
for the current rate lam (tokens/s), each row's net value of an option is
E_r(o) - lam * (its own time), an arm group costs lam * arm_fixed[a] once, so
opening a group pays only if its rows gain more than that together (a draft
LM's forward costs nearly the same for one row as for all: joining an open
group is cheap, opening one is not). Groups are opened greedily while one
pays; lam is then recomputed and the choice redone (a few rounds). All of it
is [B, A] numpy: no per-row Python. A batch of one row needs none of it:
its best option is the one with the highest step rate.

Expected tokens come from the controller (each request's observed tokens per
step with each arm, optimistic by a UCB bonus); ``expected_tokens`` turns a
per-token acceptance alpha into them where only a rate is known (the prompt
probe's agreement): with k drafted tokens a step yields
``(1 - alpha^(k+1)) / (1 - alpha)`` tokens in expectation.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def expected_tokens(alpha: np.ndarray, k: int) -> np.ndarray:
    """Tokens a step yields with k drafts of per-token acceptance alpha (>= 1)."""
    a = np.clip(alpha, 0.0, 0.999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclasses.dataclass
class StepCosts:
    """Seconds. Arms' costs indexed by arm; measured online by the engine."""

    target_fixed: float
    target_per_token: float
    arm_fixed: np.ndarray  # [A] a group's cost that does not depend on its rows
    arm_per_row: np.ndarray  # [A] one more row in an open group


def choose_by_throughput(tokens: np.ndarray, catch_up_s: np.ndarray, costs: StepCosts,
                         k: int, rounds: int = 3) -> np.ndarray:
    """Arm per row (-1: no draft) maximising the step's expected tokens per second.

    ``tokens`` [B, A]: expected tokens of row r with arm a (>= 1);
    ``catch_up_s`` [B, A]: seconds arm a needs to catch up on row r first.
    """
    b, a = tokens.shape
    if b == 0 or a == 0:
        return np.full(b, -1, dtype=np.int64)
    per_row_s = (costs.target_per_token * k + costs.arm_per_row)[None, :] + catch_up_s
    if b == 1:  # one row: each option's own step rate, the best of them (exact)
        plain_s = costs.target_fixed + costs.target_per_token
        rate = tokens[0] / (plain_s + per_row_s[0] + costs.arm_fixed)
        best = int(rate.argmax())
        return np.array([best if rate[best] * plain_s > 1.0 else -1], dtype=np.int64)
    choice = np.full(b, -1, dtype=np.int64)
    rows = np.arange(b)
    lam = b / (costs.target_fixed + costs.target_per_token * b)  # plain decoding's rate
    for _ in range(rounds):
        gain = tokens - 1.0 - lam * per_row_s  # vs. no draft, per row and arm
        fixed = lam * costs.arm_fixed
        opened = np.zeros(a, dtype=bool)
        best = np.zeros(b)  # each row's gain under the groups opened so far
        while True:
            extra = np.maximum(gain - best[:, None], 0.0).sum(0) - fixed
            extra[opened] = -np.inf
            arm = int(np.argmax(extra))
            if extra[arm] <= 0:
                break
            opened[arm] = True
            best = np.maximum(best, gain[:, arm])
        masked = np.where(opened[None, :], gain, -np.inf)
        pick = masked.argmax(1)
        choice = np.where(masked[rows, pick] > 0, pick, -1)
        drafting = choice >= 0
        e = np.where(drafting, tokens[rows, np.maximum(choice, 0)], 1.0).sum()
        t = (costs.target_fixed + costs.target_per_token * b
             + np.where(drafting, per_row_s[rows, np.maximum(choice, 0)], 0.0).sum()
             + costs.arm_fixed[np.unique(choice[drafting])].sum())
        new = e / t
        if abs(new - lam) <= 1e-6 * lam:
            break
        lam = new
    return choice


class LinearCost:
    """Online least-squares fit ``seconds = fixed + slope * x`` with
    exponential forgetting (so it follows a machine whose load changes).
    The fit is solved once per observation (``add``), not per read."""

    def __init__(self, decay: float = 0.995):
        self.decay = decay
        self.s = (0.0, 0.0, 0.0, 0.0, 0.0)  # weight, x, y, x^2, x*y (plain floats: per step)
        self._fit = (0.0, 0.0)

    def add(self, x: float, y: float) -> None:
        d = self.decay
        w, sx, sy, sxx, sxy = self.s
        self.s = (d * w + 1.0, d * sx + x, d * sy + y, d * sxx + x * x, d * sxy + x * y)
        self._fit = self._solve()

    @property
    def seen(self) -> bool:
        return self.s[0] > 0.0

    def fit(self) -> tuple[float, float]:
        return self._fit

    def _solve(self) -> tuple[float, float]:
        w, x, y, xx, xy = self.s
        mx, my = x / w, y / w
        var = xx / w - mx * mx
        slope = max((xy / w - mx * my) / var, 0.0) if var > 1e-9 * max(mx * mx, 1.0) else 0.0
        if slope == 0.0 and mx > 0:  # one batch size seen so far: split evenly
            return my / 2, my / (2 * mx)
        return max(my - slope * mx, 0.0), slope
