"""The step controller: MetaSD's rules for one engine step, without vLLM.

One ledger per request (its ``RequestState``: bandit, statistics, the arm
awaiting verification, and how far each drafter's KV reaches), created on the
request's first step and freed by one call. The rules:

- a request's bandit picks its arm; a disabled arm earns 0 and the policy
  chooses again (at most once per arm), else the row drafts nothing this step;
- an arm that proposed nothing (prompt lookup found no match) earns 0 at once:
  the step yields one token, the worst outcome, and without the 0 UCB would
  keep choosing it;
- an arm that raised or returned garbage: its rows draft nothing this step and
  earn 0, their drafter KV for that arm is forgotten; after
  ``MAX_ARM_FAILURES`` consecutive failures the arm is disabled for good;
- verification feedback updates the bandit of the arm that drafted;
- preemption frees the request's drafter KV and drops its pending choice (its
  draft is never verified); resumption or a re-used id start from no KV;
- objective "throughput": each request's bandit still names its draft LM; the
  whole step then decides together, by expected tokens per second
  (``core.objective``), whether each row drafts with it, takes a free arm
  (n-gram) or drafts nothing, from each request's optimistic tokens per step
  with each arm and costs measured online (the target's time per processed
  token, each arm group's drafting time). Arms whose drafts cost nothing to
  make (n-gram) draft for every row before the choice and learn from every
  verified step (full information), so they are valued at their mean,
  without the exploration bonus; a free arm is offered to a row only when
  it proposes something this step, and is valued at what it yields when it
  does (an empty draft earns its bandit 0, but is no sample of its gain:
  the choice knows when there is none). With warm start, a new request's
  bandit and estimates start from the finished requests whose prompts are
  most like its own (``core.warm_start``). A pinned arm (policy "fixed") is
  never second-guessed;
- prompt-informed start (``probed``): a new request's bandit starts with one
  observation per arm it is probed by (``to_probe``: every arm, or with warm
  start those no finished request with a similar prompt tried), what its
  drafts would have had accepted over the request's own text.

``propose`` in vllm_metasd/proposer.py and benchmarks/replay.py both drive it.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from vllm_metasd.core.objective import (
    LinearCost, StepCosts, choose_by_throughput, priced, row_options,
)
from vllm_metasd.core.state import RequestState, RequestStateStore

logger = logging.getLogger("vllm.metasd")

MAX_ARM_FAILURES = 3


class StepController:
    """``k``: drafted tokens per step; ``free_arms``: arms whose drafting costs
    no model forward (n-gram); ``beta``: the throughput objective's UCB weight."""

    def __init__(self, store: RequestStateStore, k: int = 4, objective: str = "alignment",
                 free_arms: Sequence[bool] | None = None, beta: float = 0.1):
        self.store = store
        n = store.policy.num_arms
        self.num_arms = n
        self.k, self.objective = k, objective
        self.free_arms = np.array(free_arms if free_arms is not None else [False] * n, dtype=bool)
        # The throughput objective's UCB weight per arm (none for free arms)
        self._bonus = np.where(self.free_arms, 0.0, k * np.sqrt(beta))
        self.target_cost = LinearCost()  # seconds of a target step per token verified
        self.arm_cost = [LinearCost() for _ in range(n)]  # seconds of a group per row
        # each arm_cost's (fixed, per row) as last measured (nan: not yet)
        self._arm_fits = np.full((n, 2), np.nan)
        self.failures = [0] * n  # consecutive, per arm
        self.total_failures = [0] * n
        self.disabled = np.zeros(n, dtype=bool)  # per arm, for the engine's lifetime
        self.preempted = 0
        # Drafted tokens verified for no arm: vLLM's -1 placeholders (a request
        # resumed after preemption, or new with one uncached token).
        self.placeholder_drafts = 0
        self._rows: list[RequestState | None] = []  # this step's ledgers, by batch row
        self._begun = False
        if objective == "throughput":  # compile its kernels now, not during a step
            zeros = np.zeros((1, n))
            self._choose_rows(zeros, zeros, zeros, np.zeros(1, dtype=np.int64),
                              np.zeros(1, dtype=np.int64), np.zeros((1, n), dtype=np.int64))

    # ---- lifecycle -------------------------------------------------------------

    def finished(self, req_id: str) -> None:
        self.store.free(req_id)

    def preempted_request(self, req_id: str) -> None:
        """Its KV blocks are gone; the bandit keeps what it learnt."""
        self.preempted += 1
        if (state := self.store.get(req_id)) is not None:
            state.computed.clear()
            state.last_arm = None  # its pending draft is never verified

    def restarted(self, req_id: str) -> None:
        """Resumed after preemption, or a new request under a re-used id."""
        if (state := self.store.get(req_id)) is not None:
            state.computed.clear()

    # ---- one step --------------------------------------------------------------

    def begin(self, req_ids: Sequence[str], active: np.ndarray,
              prompt_of: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
        """This step's ledgers, by batch row (``active``: rows with a new
        token; ``prompt_of(row)``: the row's prompt token ids, read for new
        requests only, for the warm start). Returns the rows whose request is
        new (ledger created now)."""
        rows: list[RequestState | None] = [None] * len(req_ids)
        new = []
        store = self.store
        for row in np.flatnonzero(active).tolist():
            state = store.get(req_ids[row])
            if state is None:
                state = store.get_or_create(
                    req_ids[row], None if prompt_of is None else prompt_of(row))
                new.append(row)
            rows[row] = state
        self._rows = rows
        self._begun = True
        return np.array(new, dtype=np.int64)

    def choose(self, req_ids: Sequence[str], active: np.ndarray,
               seq_lens: np.ndarray | None = None,
               proposed: np.ndarray | None = None) -> np.ndarray:
        """Arm per batch row (-1: no speculation), after ``begin`` (called here
        if it was not). For the throughput objective: ``seq_lens``, tokens
        known per row (it prices each arm's catch-up); ``proposed`` [B, A],
        how many tokens each free arm proposes for each row this step (its
        drafts, made before the choice; None: assumed k)."""
        if not self._begun:
            self.begin(req_ids, active)
        self._begun = False
        arms = np.full(len(req_ids), -1, dtype=np.int64)
        rows = self._rows
        live = np.flatnonzero(active).tolist()
        if (self.objective == "throughput" and self.target_cost.seen and seq_lens is not None
                and self.store.policy.name != "fixed"):  # a pinned arm stays pinned
            if proposed is None:
                proposed = np.full((len(req_ids), self.num_arms), self.k, dtype=np.int64)
            arms[live] = self._choose_throughput([rows[r] for r in live], seq_lens[live],
                                                 proposed[live])
            return arms
        for row in live:  # one bandit per request
            arms[row] = self._choose_one(rows[row])
        return arms

    def costs(self) -> StepCosts:
        """The online cost model; an arm not yet measured is priced like the
        measured arms of its kind (or free)."""
        fits = priced(self._arm_fits, self.free_arms)
        t0, t1 = self.target_cost.fit()
        return StepCosts(t0, t1, fits[:, 0], fits[:, 1])

    def cost_snapshot(self) -> dict:
        """What the cost model believes a step costs (ms; measured under every
        objective, chosen by under "throughput"): the target's fixed time and
        time per verified token, and per arm a group's fixed time and time per
        row (an arm not yet measured: priced as in ``costs``)."""
        c = self.costs()
        ms = lambda v: round(1e3 * float(v), 4)  # noqa: E731
        return {"target_fixed_ms": ms(c.target_fixed),
                "target_per_token_ms": ms(c.target_per_token),
                "arms": {name: {"group_fixed_ms": ms(f), "per_row_ms": ms(r)}
                         for name, f, r in zip(self.store.arm_names, c.arm_fixed, c.arm_per_row)}}

    def _choose_throughput(self, states: list[RequestState], seq_lens: np.ndarray,
                           proposed: np.ndarray) -> np.ndarray:
        b, n_arms = len(states), self.num_arms
        gain = np.array([s.gain_sum for s in states]).reshape(b, n_arms)
        count = np.array([s.gain_count for s in states]).reshape(b, n_arms)
        computed = np.array([[s.computed.get(a, 0) for a in range(n_arms)] for s in states],
                            dtype=np.float64).reshape(b, n_arms)
        # Which draft LM is the row's own bandit's (alignment) choice; the step
        # then decides by speed whether the row drafts with it, joins an open
        # group, takes a free arm, or drafts nothing.
        select = self.store.policy.select
        pick = np.array([select(s.bandit) for s in states], dtype=np.int64)
        choice = self._choose_rows(gain, count, computed, seq_lens.astype(np.int64), pick,
                                   proposed.astype(np.int64, copy=False))
        for state, arm in zip(states, choice.tolist()):
            if arm >= 0:
                self.store.assign(state, arm)
            else:
                state.last_arm = None
        return choice

    def _choose_rows(self, gain, count, computed, seq_lens, pick, proposed) -> np.ndarray:
        costs = self.costs()
        tokens, catch_up = row_options(gain, count, computed, seq_lens, pick, self.free_arms,
                                       self._bonus, self.disabled, self.k, costs.arm_per_row,
                                       proposed)
        return choose_by_throughput(tokens, catch_up, costs, self.k)

    def observe_step_time(self, tokens: int, seconds: float) -> None:
        """The target's step (verification of ``tokens``) took ``seconds``."""
        self.target_cost.add(tokens, seconds)

    def observe_group_time(self, arm: int, rows: int, seconds: float) -> None:
        cost = self.arm_cost[arm]
        cost.add(rows, seconds)
        self._arm_fits[arm] = cost.fit()

    def full_information(self, arm: int, req_ids: Sequence[str], rewards: Sequence[float],
                         accepted: Sequence[int], lengths: Sequence[int]) -> None:
        """Drafts ``arm`` (a free arm) would have made for requests it did not
        draft for, of ``lengths`` tokens, scored against the verified tokens
        (reward, and tokens that would have been accepted): they inform each
        request's bandit and estimates (an empty draft: its bandit only), not
        the drafter's statistics."""
        for req_id, reward, a, n in zip(req_ids, rewards, accepted, lengths):
            state = self.store.get(req_id)
            if state is None or state.last_arm == arm:
                continue
            self._inform(state, arm, reward, a if n else None)

    def to_probe(self, rows: np.ndarray) -> np.ndarray:
        """[rows, arms]: which arms to score on each new row's prompt (none
        without ``prompt_probe``)."""
        ledgers = self._rows
        out = np.zeros((len(rows), self.num_arms), dtype=bool)
        for i, r in enumerate(rows.tolist()):
            if (probe := ledgers[r].probe) is not None:
                out[i] = probe
        return out

    def probed(self, arm: int, rows: np.ndarray, computed: np.ndarray,
               accepted: np.ndarray) -> None:
        """A prompt-informed start (new rows of this step): the arm processed
        each row's known tokens, and its drafts would have had ``accepted``
        drafted tokens accepted a step over the row's text (NaN: it proposes
        nothing there: 0 for the bandit, no sample of its tokens per step, as
        an empty draft): one observation for the request's bandit."""
        self.mark_caught_up(arm, rows, computed)
        proposes = ~np.isnan(accepted)
        accepted = np.where(proposes, accepted, 0.0)
        for r, reward, a, p in zip(rows.tolist(), self._as_reward(accepted).tolist(),
                                   accepted.tolist(), proposes.tolist()):
            self._inform(self._rows[r], arm, reward, a if p else None)

    def _as_reward(self, accepted: np.ndarray) -> np.ndarray:
        """Accepted tokens per step on the rewards' scale: over the engine's
        accepted tokens per unit of reward (before any verification: per
        drafted token)."""
        t = self.store.totals
        total = sum(t.accepted)
        scale = sum(t.reward_sum) / total if total > 0 else 1.0 / self.k
        return np.clip(accepted * scale, 0.0, 1.0)

    def _inform(self, state: RequestState, arm: int, reward: float,
                accepted: float | None) -> None:
        """One observation for the request's bandit and, unless ``accepted`` is
        None, for its tokens-per-step estimate."""
        state.stats.reward_sum[arm] += reward
        state.stats.reward_count[arm] += 1
        if accepted is not None:
            state.observe_gain(arm, accepted)
        self.store.policy.update(state.bandit, arm, reward)

    def _choose_one(self, state: RequestState) -> int:
        for _ in range(self.num_arms):
            arm = self.store.choose(state)
            if not self.disabled[arm]:
                return arm
            self.store.record(state, arm, 0, 0, 0.0)
        state.last_arm = None
        return -1

    def caught_up(self, arm: int, rows: np.ndarray) -> np.ndarray:
        """Per row of ``rows``: leading tokens whose KV the arm holds."""
        ledgers = self._rows
        return np.fromiter((ledgers[r].computed.get(arm, 0) for r in rows.tolist()),
                           dtype=np.int64, count=len(rows))

    def mark_caught_up(self, arm: int, rows: np.ndarray, ends: np.ndarray) -> None:
        ledgers = self._rows
        for r, e in zip(rows.tolist(), ends.tolist()):
            ledgers[r].computed[arm] = e

    def drafted(self, arm: int, rows: np.ndarray, lengths: np.ndarray) -> None:
        """The arm drafted for its rows; empty drafts earn 0 now."""
        self.failures[arm] = 0
        for r in rows[lengths == 0].tolist():
            self._settle_zero(self._rows[r], arm)

    def failed(self, arm: int, rows: np.ndarray, name: str, error: Exception) -> None:
        """The arm raised or returned garbage for ``rows``."""
        self.failures[arm] += 1
        self.total_failures[arm] += 1
        for r in rows.tolist():
            state = self._rows[r]
            state.computed.pop(arm, None)
            self._settle_zero(state, arm)
        if self.failures[arm] >= MAX_ARM_FAILURES:
            self.disabled[arm] = True
            logger.warning("MetaSD: drafter %r failed %d times in a row (last: %s: %s); "
                           "disabled for this engine's lifetime", name,
                           self.failures[arm], type(error).__name__, error)
        else:
            logger.warning("MetaSD: drafter %r failed (%s: %s); %d request(s) get no "
                           "speculation this step", name, type(error).__name__, error,
                           len(rows))

    def _settle_zero(self, state: RequestState, arm: int) -> None:
        self.store.record(state, arm, 0, 0, 0.0)
        if not self.free_arms[arm]:  # a free arm is offered only when it proposes
            state.observe_gain(arm, 0.0)
        state.last_arm = None  # nothing awaits verification

    def observe(self, req_ids: Sequence[str], drafted: Sequence[int],
                accepted: Sequence[int], rewards: Sequence[float]) -> None:
        """Verification of last step's drafts: reward the arm that drafted each row."""
        store = self.store
        for req_id, n, a, r in zip(req_ids, drafted, accepted, rewards):
            if n == 0:
                continue
            state = store.get(req_id)
            if state is None or state.last_arm is None:
                self.placeholder_drafts += n
                continue
            store.record(state, state.last_arm, n, a, r)
            state.observe_gain(state.last_arm, a)


__all__ = ["MAX_ARM_FAILURES", "StepController"]
