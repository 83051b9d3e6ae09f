"""What the bandits learn beyond the verified drafts of the chosen arm.

- The prompt-informed start (metasd.json ``prompt_probe``): on a request's
  first step every arm is scored on the request's own known tokens (a draft
  LM passes over them, which also fills its KV; the lookup tries each of the
  last positions), one observation per arm for the request's bandit.
- Free arms (n-gram lookups, under the throughput objective) draft for every
  row before the choice, so the choice knows which rows they propose for;
  what each would have drafted for the rows it did not draft for is scored
  on the next step against the verified tokens (full information: the
  objective values them at their mean, with no exploration bonus).
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit

from vllm_metasd.core.controller import StepController
from vllm_metasd.core.draft import DraftStep
from vllm_metasd.faults import check_draft

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


class FreeDrafts:
    """The free arms' drafts of one step, made for every active row before the
    choice (what each proposes is part of the choice: ``proposed``); the rows
    that chose the arm draft with them (``draft_for``), the others' are kept
    until the next step's verified tokens score them (``score``)."""

    def __init__(self):
        one = np.ones((1, 1), dtype=np.int32)  # compile now, with the engine's types
        matched_prefix(one, np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64), one,
                       np.ones(1, dtype=np.int64))
        self._made = {}  # free arm -> (its rows, draft ids, lengths), this step's
        self._pending = []  # per free arm: (arm, batch rows, draft ids, draft lengths)
        self._req_ids: list[str] = []  # the batch's requests, by row, when they were made

    def make(self, arms: list, names: list[str], controller: StepController,
             active: np.ndarray, seq_lens: np.ndarray, token_ids: np.ndarray,
             k: int, vocab_size: int) -> np.ndarray:
        """Each free arm drafts for every active row (checked as any draft).
        Returns [rows, arms]: the tokens each free arm proposes for each row
        (0 for the other arms, and for a free arm that failed: its rows are
        settled as a failure)."""
        self._made = {}
        proposed = np.zeros((len(seq_lens), len(arms)), dtype=np.int64)
        rows = np.flatnonzero(active)
        if len(rows) == 0:
            return proposed
        for a, arm in enumerate(arms):
            if not arm.deterministic or controller.disabled[a]:
                continue
            t0 = time.perf_counter()
            try:
                ids, lengths = check_draft(arm.draft(DraftStep(
                    rows=rows, starts=rows, seq_lens=seq_lens, token_ids=token_ids,
                    block_table=None, sampling_metadata=None, k=k, want_q=False)),
                    len(rows), k, vocab_size)
            except Exception as e:  # a drafter must never take the engine down
                controller.failed(a, rows, names[a], e)
                continue
            controller.observe_group_time(a, len(rows), time.perf_counter() - t0)
            proposed[rows, a] = lengths
            self._made[a] = (rows, ids, lengths)
        return proposed

    def draft_for(self, a: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Free arm a's (ids, lengths) for ``rows`` (active rows, ascending),
        made before the choice; None if it made none this step."""
        if a not in self._made:
            return None
        made, ids, lengths = self._made[a]
        i = np.searchsorted(made, rows)
        return ids[i], lengths[i]

    def keep_unchosen(self, choice: np.ndarray, req_ids: list[str]) -> None:
        """The drafts of rows that did not take the arm wait for the next step."""
        self._pending = []
        self._req_ids = req_ids
        for a, (rows, ids, lengths) in self._made.items():
            other = choice[rows] != a
            if other.any():
                self._pending.append((a, rows[other], ids[other], lengths[other]))
        self._made = {}

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
            controller.full_information(a, who, reward.tolist(), matched.tolist(),
                                        lengths.tolist())


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
