"""What the bandits learn beyond the verified drafts of the chosen arm.

- The prompt-informed start (metasd.json ``prompt_probe``): on a request's
  first step every arm is scored on the request's own known tokens (a draft
  LM passes over them, which also fills its KV; the lookup tries each of the
  last positions), one observation per arm for the request's bandit.
- Full information for free arms (n-gram lookups, under the throughput
  objective): what each would have drafted for the rows it did not draft
  for, scored on the next step against the verified tokens (so the objective
  values them at their mean, with no exploration bonus).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from vllm_metasd.core.controller import StepController
from vllm_metasd.core.draft import DraftStep

# The prompt probe scores the last PROBE_WINDOW positions of a new request's text.
PROBE_WINDOW = 32


def probe_new_requests(arms: list, names: list[str], controller: StepController,
                       step: DraftStep) -> None:
    """``step.rows``: this step's new requests (``controller.begin``)."""
    for a, arm in enumerate(arms):
        if controller.disabled[a]:
            continue
        try:
            computed, agreement = arm.probe(step, PROBE_WINDOW)
        except Exception as e:  # a drafter must never take the engine down
            controller.failed(a, step.rows, names[a], e)
            continue
        controller.probed(a, step.rows, computed, agreement)


class WouldBeDrafts:
    """The free arms' drafts for the rows they did not draft for, pending until
    the next step's verified tokens score them."""

    def __init__(self):
        one = np.ones((1, 1), dtype=np.int32)  # compile now, with the engine's types
        matched_prefix(one, one[0], np.zeros(1, dtype=np.int64), one, np.ones(1, dtype=np.int64))
        self._pending = []  # per free arm: (arm, batch rows, draft ids, draft lengths)
        self._req_ids: list[str] = []  # the batch's requests, by row, when they were made

    def make(self, arms: list, choice: np.ndarray, active: np.ndarray, req_ids: list[str],
             seq_lens: np.ndarray, token_ids: np.ndarray, k: int) -> None:
        self._pending = []
        self._req_ids = req_ids
        for a, arm in enumerate(arms):
            if not arm.deterministic:
                continue
            rows = np.flatnonzero(active & (choice != a))
            if len(rows) == 0:
                continue
            d = arm.draft(DraftStep(rows=rows, starts=rows, seq_lens=seq_lens,
                                    token_ids=token_ids, block_table=None,
                                    sampling_metadata=None, k=k, want_q=False))
            self._pending.append((a, rows, d.ids, d.lengths))  # the arm's copies

    def score(self, controller: StepController, req_ids: list[str], new_tokens: np.ndarray,
              valid: np.ndarray) -> None:
        """Each pending draft's matched prefix among this step's verified tokens:
        reward per drafted token (an empty draft scores 0) and accepted count."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        made_for = self._req_ids
        row_of = None if req_ids == made_for else {r: i for i, r in enumerate(req_ids)}
        for a, rows, ids, lengths in pending:
            who = [made_for[r] for r in rows.tolist()]
            if row_of is not None:  # the batch changed: requests by id
                now = np.array([row_of.get(r, -1) for r in who], dtype=np.int64)
                kept = np.flatnonzero(now >= 0)
                who, rows, ids, lengths = [who[i] for i in kept], now[kept], ids[kept], lengths[kept]
            reward, matched = matched_prefix(ids, lengths, rows, new_tokens, valid)
            controller.full_information(a, who, reward.tolist(), matched.tolist())


@njit(cache=True)
def matched_prefix(ids, lengths, rows, new_tokens, valid):
    """Per draft i (ids[i, :lengths[i]], made for batch row rows[i]): how many
    of its leading tokens the verified ones (new_tokens[row, :valid[row]])
    repeat, and that over its length (an empty draft scores 0)."""
    n = ids.shape[0]
    matched = np.zeros(n, dtype=np.int64)
    reward = np.zeros(n)
    for i in range(n):
        r = rows[i]
        m = 0
        while (m < lengths[i] and m < valid[r] and m < new_tokens.shape[1]
               and ids[i, m] == new_tokens[r, m]):
            m += 1
        matched[i] = m
        if lengths[i] > 0:
            reward[i] = m / lengths[i]
    return reward, matched
