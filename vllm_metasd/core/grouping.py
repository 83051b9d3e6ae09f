"""Bookkeeping the proposer needs each step: rows per arm, and drafter catch-up.

Catch-up: a draft LM holds KV for a request only up to the tokens it has
processed. A drafter not chosen for some steps misses the tokens generated
meanwhile and must process them before drafting again (MetaSD's switching
cost). ``CatchUpTracker`` remembers, per (request, drafter), how many leading
tokens have valid drafter KV.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def group_rows_by_arm(arms: Sequence[int] | np.ndarray, num_arms: int) -> list[np.ndarray]:
    """Row indices per arm, each in ascending row order; rows with arm < 0
    (nothing to draft this step) belong to no group."""
    arms = np.asarray(arms, dtype=np.int64)
    if arms.size and arms.max() >= num_arms:
        raise ValueError(f"arm {int(arms.max())} out of range for {num_arms} arms")
    order = np.argsort(arms, kind="stable")
    bounds = np.searchsorted(arms[order], np.arange(num_arms + 1))
    return [order[bounds[a]:bounds[a + 1]] for a in range(num_arms)]


def plan_catch_up(starts: np.ndarray, ends: np.ndarray, budget: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split one arm's rows into forward passes of at most ``budget`` tokens.

    Row i must process tokens [starts[i], ends[i]) before drafting. Returns
    (row indices, end per row) per pass. A row whose catch-up alone exceeds
    the budget gets a pass of its own that stops ``budget`` tokens later: that
    pass only fills KV (its draft is discarded) and the row catches up over
    several steps, never drafting from unfilled KV.
    """
    if budget < 2:
        raise ValueError(f"catch-up budget must be >= 2 tokens, got {budget}")
    need = ends - starts
    passes, rows, used = [], [], 0
    for i in np.argsort(need, kind="stable"):
        if need[i] > budget:
            passes.append((np.array([i]), np.array([starts[i] + budget])))
            continue
        if used + need[i] > budget:
            passes.append((np.array(rows), ends[rows]))
            rows, used = [], 0
        rows.append(i)
        used += need[i]
    if rows:
        passes.append((np.array(rows), ends[rows]))
    return passes


class CatchUpTracker:
    """Per (request, arm): number of leading tokens whose KV the drafter holds.
    A dict of small per-request dicts (arm -> count): O(1) per operation, and
    arms never chosen for a request cost nothing."""

    def __init__(self) -> None:
        self._computed: dict[str, dict[int, int]] = {}

    def __len__(self) -> int:
        return len(self._computed)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._computed

    def computed(self, req_id: str, arm: int) -> int:
        return self._computed.get(req_id, {}).get(arm, 0)

    def pending(self, req_id: str, arm: int, seq_len: int) -> int:
        """Tokens the drafter must process before it can draft at ``seq_len``."""
        return max(seq_len - self.computed(req_id, arm), 0)

    def mark_computed(self, req_id: str, arm: int, n: int) -> None:
        self._computed.setdefault(req_id, {})[arm] = n

    def invalidate(self, req_id: str, arm: int | None = None, *, from_pos: int) -> None:
        """KV at positions >= from_pos is no longer valid, for one arm or all
        (rejected draft tokens, preemption): the valid prefix shrinks to from_pos."""
        arms = self._computed.get(req_id)
        if not arms:
            return
        for a in (arms if arm is None else [arm] if arm in arms else []):
            arms[a] = min(arms[a], from_pos)

    def free(self, req_id: str) -> None:
        self._computed.pop(req_id, None)
