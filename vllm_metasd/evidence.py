"""What the bandits learn beyond the verified drafts of the chosen arm.

- The prompt-informed start (metasd.json ``prompt_probe``): on a request's
  first step each arm it is to be probed by (``StepController.to_probe``) is
  scored on the request's own known tokens (a draft LM passes over them,
  which also fills its KV; the lookup tries each of the last positions): the
  tokens its drafts would have had accepted there, one observation per arm
  for the request's bandit and estimates.
- Free arms (n-gram lookups, under the throughput objective) draft for every
  row before the choice, so the choice knows which rows they propose for;
  what each would have drafted for the rows it did not draft for is scored
  once the tokens at its positions are verified (full information: the
  objective values them at their mean, with no exploration bonus).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from numba import njit

from vllm_metasd.core.controller import StepController
from vllm_metasd.core.draft import DraftStep
from vllm_metasd.faults import check_draft

# The prompt probe scores the last PROBE_WINDOW positions of a new request's text.
PROBE_WINDOW = 32


def probe_new_requests(arms: list, names: list[str], controller: StepController,
                       step: DraftStep) -> bool:
    """``step.rows``: this step's new requests (``controller.begin``). Returns
    whether any arm passed over a prompt."""
    wanted = controller.to_probe(step.rows)
    probed = False
    for a, (arm, mask) in enumerate(zip(arms, wanted.T)):
        rows = step.rows[mask]
        if controller.disabled[a] or len(rows) == 0:
            continue
        probed = True
        try:
            computed, accepted = arm.probe(
                dataclasses.replace(step, rows=rows, starts=step.starts[mask]),
                PROBE_WINDOW, controller.k)
        except Exception as e:  # a drafter must never take the engine down
            controller.failed(a, rows, names[a], e)
            continue
        controller.probed(a, rows, computed, accepted)
    return probed


class FreeDrafts:
    """The free arms' drafts of one step, made for every active row before the
    choice (what each proposes is part of the choice: ``proposed``); the rows
    that chose the arm draft with them (``draft_for``), the others' are kept
    until the tokens at their positions are verified (``score``)."""

    def __init__(self):
        one = np.ones((1, 1), dtype=np.int32)  # compile now, with the engine's types
        i64 = np.ones(1, dtype=np.int64)
        matched_known(one, i64, i64 - 1, i64 - 1, one, np.ones(1, dtype=np.int32))
        self._made = {}  # free arm -> (its rows, draft ids, lengths), this step's
        # drafts of rows that did not take them, until scored: entries of
        # (free arm, request ids, position of the first drafted token, ids, lengths)
        self._pending = []

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

    def keep_unchosen(self, choice: np.ndarray, req_ids: list[str],
                      seq_lens: np.ndarray) -> None:
        """The drafts of rows that did not take the arm wait until the tokens
        they proposed are verified (``score``)."""
        for a, (rows, ids, lengths) in self._made.items():
            other = choice[rows] != a
            if other.any():
                rows = rows[other]
                self._pending.append((a, [req_ids[r] for r in rows.tolist()],
                                      seq_lens[rows].astype(np.int64), ids[other],
                                      lengths[other]))
        self._made = {}

    def score(self, controller: StepController, req_ids: list[str], token_ids: np.ndarray,
              seq_lens: np.ndarray) -> None:
        """Each pending draft, once the tokens at its positions are known (the
        runner's token buffer, this step's verified ones included) or it
        mismatched one of them: its matched prefix, reward per drafted token
        (an empty draft scores 0) and accepted count. Scored against the
        step that verified it only, a draft could match no more than that
        step's tokens (one, after a step that drafted nothing), which held the
        lookup's estimate below what it yields (replay on SmolLM2: 0.65x the
        lookup alone vs 0.92x scored in full)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        row_of = {r: i for i, r in enumerate(req_ids)}
        for a, who, starts, ids, lengths in pending:
            rows = np.array([row_of.get(r, -1) for r in who], dtype=np.int64)
            matched, final = matched_known(ids, lengths, rows, starts, token_ids, seq_lens)
            done = np.flatnonzero(final)
            if len(done):
                m = matched[done]
                controller.full_information(
                    a, [who[i] for i in done.tolist()],
                    (m / np.maximum(lengths[done], 1)).tolist(), m.tolist(),
                    lengths[done].tolist())
            wait = np.flatnonzero(~final & (rows >= 0))
            if len(wait):  # resolved within k of its request's steps: few entries per arm
                self._pending.append((a, [who[i] for i in wait.tolist()], starts[wait],
                                      ids[wait], lengths[wait]))


@njit(cache=True)
def matched_known(ids, lengths, rows, starts, token_ids, seq_lens):
    """Per draft i (ids[i, :lengths[i]] for positions starts[i]... of batch row
    rows[i]; -1: the request is gone): its leading tokens that the known
    tokens (token_ids[row, :seq_lens[row]]) repeat, and whether that is final
    (every drafted position known, or a mismatch among them)."""
    n = ids.shape[0]
    matched = np.zeros(n, dtype=np.int64)
    final = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        r = rows[i]
        if r < 0:
            continue
        known = min(seq_lens[r] - starts[i], lengths[i], token_ids.shape[1] - starts[i])
        m = 0
        while m < known and ids[i, m] == token_ids[r, starts[i] + m]:
            m += 1
        matched[i] = m
        final[i] = m < known or known >= lengths[i]
    return matched, final
