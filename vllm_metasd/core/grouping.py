"""Rows per arm, and how a draft LM's catch-up splits into forward passes.

Catch-up: a draft LM holds KV for a request only up to the tokens it has
processed (the request's ledger, ``RequestState.computed``). A drafter not
chosen for some steps misses the tokens generated meanwhile and must process
them before drafting again (MetaSD's switching cost).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# A pass over tokens [s, e) feeds tokens [s, e-1) plus the newest one; a
# KV-filling chunk leaves at least this many tokens for the drafting pass.
MIN_PASS = 2


def group_rows_by_arm(arms: Sequence[int] | np.ndarray, num_arms: int) -> list[np.ndarray]:
    """Row indices per arm, each in ascending row order; rows with arm < 0
    (nothing to draft this step) belong to no group."""
    arms = np.asarray(arms, dtype=np.int64)
    if arms.size and arms.max() >= num_arms:
        raise ValueError(f"arm {int(arms.max())} out of range for {num_arms} arms")
    order = np.argsort(arms, kind="stable")
    bounds = np.searchsorted(arms[order], np.arange(num_arms + 1))
    return [order[bounds[a]:bounds[a + 1]] for a in range(num_arms)]


def plan_catch_up(starts: np.ndarray, ends: np.ndarray, budget: int
                  ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
    """Split one arm's rows into forward passes of at most ``budget`` tokens.

    Row i must process tokens [starts[i], ends[i]) (ends[i] - starts[i] >=
    MIN_PASS) and then draft. Returns passes ``(rows, starts, ends, drafts)``.
    A row longer than the budget first gets KV-filling passes of its own
    (``drafts`` False: their drafts are discarded) of at most ``budget`` tokens,
    in order, until the rest fits; every row then appears in exactly one
    drafting pass, which ends at ends[i]. Rows keep their order within passes.
    """
    if budget < 2 * MIN_PASS:
        raise ValueError(f"catch-up budget must be >= {2 * MIN_PASS} tokens, got {budget}")
    starts = np.array(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    passes = []
    for i in np.flatnonzero(ends - starts > budget).tolist():
        s = int(starts[i])
        while ends[i] - s > budget:
            e = min(s + budget, int(ends[i]) - MIN_PASS)
            passes.append((np.array([i]), np.array([s]), np.array([e]), False))
            s = e
        starts[i] = s
    need = ends - starts
    if need.sum() <= budget:  # the common case: one pass
        return passes + [(np.arange(len(starts)), starts, ends, True)]
    group, used = [], 0
    for i, n in enumerate(need.tolist()):
        if used + n > budget:
            passes.append((np.array(group), starts[group], ends[group], True))
            group, used = [], 0
        group.append(i)
        used += n
    passes.append((np.array(group), starts[group], ends[group], True))
    return passes
