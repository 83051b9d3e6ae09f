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
pays; lam is then recomputed and the choice redone (a few rounds). It is
compiled (numba): no per-row Python, and no chain of small numpy calls, which
cost several times their usual time right after a model forward (its weights
leave the CPU caches cold: the controller's choice for one request took 39 us
back to back and 315 us right after a large matrix product, in numpy). A batch
of one row needs none of it: its best option is the one with the highest
step rate.

Expected tokens come from the controller (each request's observed tokens per
step with each arm, optimistic by a UCB bonus); a new request's first
estimates can come from its prompt (``probe_accepted``: what each arm's drafts
would have had accepted over the prompt's own text).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vllm_metasd.core.jit import njit


def draft_runs(hits: np.ndarray, row: np.ndarray, k: int) -> np.ndarray:
    """Per position t, the drafted tokens a greedy k-token draft from t has
    accepted: the run of hits from t, at most k, within t's row. ``hits``
    [positions]: whether the drafter's next token after that position's prefix
    is the token that follows (teacher-forced: while a greedy draft hits, its
    inputs are the true tokens), positions of a row contiguous and in order,
    ``row`` each one's row."""
    hits = np.asarray(hits, dtype=bool)
    n = len(hits)
    runs = hits.astype(np.float64)
    live = hits.copy()
    for j in range(1, k):  # live[t]: hits at t .. t + j, all in t's row
        ahead = np.zeros(n, dtype=bool)
        ahead[:n - j] = hits[j:] & (row[j:] == row[:n - j])
        live &= ahead
        runs += live
    return runs


def probe_accepted(hits: np.ndarray, row: np.ndarray, num_rows: int, k: int) -> np.ndarray:
    """The prompt probe's estimate per row: ``draft_runs`` averaged over the
    row's scored positions (NaN: none) — not the i.i.d. bound
    ``(1 - a^(k+1)) / (1 - a) - 1`` of the hit rate a, which on the zoo put
    each drafter at about half the tokens it then yielded: hits come in runs.
    Positions closer than k to their row's end have their runs cut short: they
    count only in a row with no other."""
    runs = draft_runs(hits, row, k)
    size = np.bincount(row, minlength=num_rows)
    index = np.arange(len(runs)) - (np.cumsum(size) - size)[row]  # position within its row
    full = size[row] - index >= k
    counted = full | (np.bincount(row, weights=full, minlength=num_rows) == 0)[row]
    with np.errstate(invalid="ignore"):
        return (np.bincount(row, weights=runs * counted, minlength=num_rows)
                / np.bincount(row, weights=counted, minlength=num_rows))


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
    per_row_s = (costs.target_per_token * k + costs.arm_per_row)[None, :] + catch_up_s
    return _choose(np.asarray(tokens, dtype=np.float64), per_row_s, float(costs.target_fixed),
                   float(costs.target_per_token), np.asarray(costs.arm_fixed, dtype=np.float64),
                   rounds)


@njit(error_model="numpy", cache=True)  # x / 0 is inf or nan, as in numpy
def _choose(tokens, per_row_s, target_fixed, target_per_token, arm_fixed, rounds):
    """``choose_by_throughput`` in one compiled pass (it runs every step,
    between model forwards that leave the CPU caches cold for numpy calls)."""
    b, a = tokens.shape
    choice = np.full(b, -1, dtype=np.int64)
    if b == 0 or a == 0:
        return choice
    if b == 1:  # one row: each option's own step rate, the best of them (exact)
        plain_s = target_fixed + target_per_token
        best, best_rate = -1, -np.inf
        for j in range(a):
            rate = tokens[0, j] / (plain_s + per_row_s[0, j] + arm_fixed[j])
            if rate > best_rate:
                best, best_rate = j, rate
        if best_rate * plain_s > 1.0:
            choice[0] = best
        return choice
    gain = np.empty((b, a))  # vs. no draft, per row and arm, at rate lam
    best_gain = np.empty(b)  # each row's gain under the groups opened so far
    opened = np.empty(a, dtype=np.bool_)
    used = np.empty(a, dtype=np.bool_)
    lam = b / (target_fixed + target_per_token * b)  # plain decoding's rate
    for _ in range(rounds):
        for r in range(b):
            for j in range(a):
                gain[r, j] = tokens[r, j] - 1.0 - lam * per_row_s[r, j]
        opened[:] = False
        best_gain[:] = 0.0
        while True:  # open the group that adds the most, while one pays
            arm, top = -1, -np.inf
            for j in range(a):
                if opened[j]:
                    continue
                extra = -lam * arm_fixed[j]
                for r in range(b):
                    extra += max(gain[r, j] - best_gain[r], 0.0)
                if extra > top:
                    arm, top = j, extra
            if arm < 0 or top <= 0.0:
                break
            opened[arm] = True
            for r in range(b):
                best_gain[r] = max(best_gain[r], gain[r, arm])
        # each row's best open group, if it gains; the step's new rate
        e, t = 0.0, target_fixed + target_per_token * b
        used[:] = False
        for r in range(b):
            pick, value = -1, -np.inf
            for j in range(a):
                if opened[j] and gain[r, j] > value:
                    pick, value = j, gain[r, j]
            if pick >= 0 and value > 0.0:
                choice[r] = pick
                e += tokens[r, pick]
                t += per_row_s[r, pick]
                used[pick] = True
            else:
                choice[r] = -1
                e += 1.0
        for j in range(a):
            if used[j]:
                t += arm_fixed[j]
        new = e / t
        if abs(new - lam) <= 1e-6 * lam:
            break
        lam = new
    return choice


@njit(error_model="numpy", cache=True)
def row_options(gain, count, computed, seq_lens, pick, free, bonus, disabled, k, arm_per_row,
                proposed):
    """The throughput objective's view of each row ([B, A] each):

    - tokens: optimistic tokens per step with each arm (UCB on the tokens'
      scale: mean observed ``gain`` beyond the target's own token plus
      ``bonus * sqrt(log(t) / n)``; an arm never observed for the row: all
      k), for the arms the row may take: its own bandit's ``pick`` and the
      free arms (0 for any other, and for disabled arms). A free arm's
      drafts are made before the choice: ``proposed`` [B, A] is how many
      tokens it proposes for the row this step; one that proposes nothing
      is no option (0), one that does is worth its mean gain over the steps
      it proposed (``gain``/``count`` count only those), at most its length;
    - catch-up seconds: an arm whose KV is more than a step behind
      (``computed`` tokens of ``seq_lens``) first passes over the missed
      tokens, about a drafted row's time over its k sequential passes.
    """
    b, a = gain.shape
    tokens = np.zeros((b, a))
    catch_up = np.zeros((b, a))
    for r in range(b):
        log_t = np.log(count[r].sum() + 1.0)
        for j in range(a):
            if not free[j] and seq_lens[r] - computed[r, j] > k + 1:
                catch_up[r, j] = arm_per_row[j] / k
            if disabled[j] or not (free[j] or j == pick[r]):
                continue
            cap = k
            if free[j]:
                cap = min(proposed[r, j], k)
                if cap <= 0:
                    continue
            n = count[r, j]
            extra = k
            if n > 0:
                seen = max(n, 1.0)
                extra = gain[r, j] / seen + bonus[j] * np.sqrt(log_t / seen)
            tokens[r, j] = 1.0 + min(max(extra, 0.0), cap)
    return tokens, catch_up


@njit(cache=True)
def priced(fits, free):
    """Each arm's (fixed, per row) cost ``fits`` [A, 2]; an arm not yet
    measured (nan) is priced like the measured arms of its kind (free or
    not; their mean), else 0."""
    out = fits.copy()
    for kind in (True, False):
        fixed = per_row = 0.0
        n = 0
        for j in range(fits.shape[0]):
            if free[j] == kind and not np.isnan(fits[j, 0]):
                fixed += fits[j, 0]
                per_row += fits[j, 1]
                n += 1
        for j in range(fits.shape[0]):
            if free[j] == kind and np.isnan(fits[j, 0]):
                out[j, 0] = fixed / n if n else 0.0
                out[j, 1] = per_row / n if n else 0.0
    return out


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
        if var > 1e-9 * max(mx * mx, 1.0):
            slope = max((xy / w - mx * my) / var, 0.0)
            return max(my - slope * mx, 0.0), slope
        if mx > 0:  # one batch size seen so far: split evenly
            return my / 2, my / (2 * mx)
        return my, 0.0
