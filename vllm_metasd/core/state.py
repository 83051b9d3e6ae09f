"""Per-request bandit state and per-drafter statistics.

One dict keyed by request id: created on a request's first step, freed when
it finishes or is aborted; every operation is O(1). Aggregate per-drafter
counters (chosen / drafted / accepted / reward) live beside it for metrics
and benchmarks.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from vllm_metasd.core.policies import BanditState, Policy
from vllm_metasd.core.warm_start import WarmStart, prompt_signature


@dataclasses.dataclass(slots=True)
class DrafterStats:
    """Per-arm counters: of one request, or summed over all requests."""

    chosen: list[int]
    drafted: list[int]
    accepted: list[int]
    reward_sum: list[float]
    reward_count: list[int]

    @classmethod
    def zeros(cls, n: int) -> "DrafterStats":
        return cls([0] * n, [0] * n, [0] * n, [0.0] * n, [0] * n)

    def mean_rewards(self) -> list[float]:
        """Per-arm mean reward; NaN for arms never rewarded."""
        return [s / c if c else math.nan for s, c in zip(self.reward_sum, self.reward_count)]

    def as_dict(self, names: list[str]) -> dict[str, dict[str, float | None]]:
        """Per arm: the sums, and the rates derived from them (None: no data)."""
        return {name: derived({"chosen": self.chosen[i], "drafted": self.drafted[i],
                               "accepted": self.accepted[i],
                               "reward_count": self.reward_count[i],
                               "reward_sum": self.reward_sum[i]})
                for i, name in enumerate(names)}


def derived(d: dict) -> dict:
    """One drafter's sums plus their rates; None where there is nothing to average."""
    return {**d,
            "acceptance_rate": d["accepted"] / d["drafted"] if d["drafted"] else None,
            "mean_reward": d["reward_sum"] / d["reward_count"] if d["reward_count"] else None}


@dataclasses.dataclass(slots=True)
class RequestState:
    bandit: BanditState
    stats: DrafterStats
    last_arm: int | None = None  # arm whose drafts await verification
    # Per arm: leading tokens of this request whose drafter KV is valid (an arm
    # never chosen for the request has no entry and costs nothing).
    computed: dict[int, int] = dataclasses.field(default_factory=dict)
    # Per arm: observations of the tokens a step with it yields beyond the
    # target's own (accepted drafts; would-be and prompt-probe estimates
    # included): the throughput objective's estimate, on the scale of tokens.
    gain_sum: np.ndarray | None = None
    gain_count: np.ndarray | None = None
    # Of which the warm start's pseudo-observations (sum, count), not this request's
    gain_prior: tuple[np.ndarray, np.ndarray] | None = None
    # Its prompt's signature (``core.warm_start``; None: no warm start, or no prompt)
    signature: np.ndarray | None = None
    # Per arm: score it on the request's prompt (``prompt_probe``; None: none)
    probe: np.ndarray | None = None

    def mean_gains(self) -> np.ndarray:
        """Per arm: this request's mean tokens per step beyond the target's
        (NaN: not observed; the warm start's pseudo-observations left out)."""
        total, count = self.gain_sum, self.gain_count
        if self.gain_prior is not None:
            total, count = total - self.gain_prior[0], count - self.gain_prior[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(count > 0, total / count, np.nan)

    def observe_gain(self, arm: int, accepted: float) -> None:
        self.gain_sum[arm] += accepted
        self.gain_count[arm] += 1


class RequestStateStore:
    """``arm_names`` label the snapshot; ``warm_start`` starts each new
    request's bandit from per-arm mean rewards of finished requests with
    prompts like its own (``core.warm_start``), and its tokens-per-step
    estimates (the throughput objective's) from their per-arm mean gains, each
    worth ``prior_pseudo_count`` observations.

    With ``prompt_probe`` a new request is scored on its own prompt
    (``StepController.probed``) by every arm (``probe``), or with the warm
    start by the arms no finished request with a similar prompt tried, which
    get no prior (``core.warm_start``)."""

    def __init__(self, policy: Policy, arm_names: list[str] | None = None,
                 warm_start: bool = False, prior_pseudo_count: float = 2.0,
                 prompt_probe: bool = False):
        self.policy = policy
        n = policy.num_arms
        self.arm_names = list(arm_names) if arm_names else [str(i) for i in range(n)]
        if len(self.arm_names) != n:
            raise ValueError(f"{len(self.arm_names)} arm names for {n} arms")
        self.warm_start = warm_start
        self.prompt_probe = prompt_probe
        self.prior_pseudo_count = prior_pseudo_count
        self.priors = WarmStart(n)
        self.totals = DrafterStats.zeros(n)
        self._states: dict[str, RequestState] = {}
        self._created = 0  # state seed: reproducible, distinct per request

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._states

    def states(self):
        """The live requests' ledgers."""
        return self._states.values()

    def get(self, req_id: str) -> RequestState | None:
        return self._states.get(req_id)

    def get_or_create(self, req_id: str, prompt: np.ndarray | None = None) -> RequestState:
        """The request's ledger; a new one (with warm start) starts from the
        finished requests most like ``prompt`` (its token ids; None: unknown)."""
        state = self._states.get(req_id)
        if state is None:
            signature = found = None
            n = self.policy.num_arms
            if self.warm_start:
                signature = None if prompt is None else prompt_signature(prompt)
                found = self.priors.prior(signature, self.prior_pseudo_count,
                                          probe=self.prompt_probe)
            state = RequestState(
                self.policy.new_state(None if found is None else found.bandit,
                                      state_seed=self._created),
                DrafterStats.zeros(n), gain_sum=np.zeros(n), gain_count=np.zeros(n),
                signature=signature)
            if found is not None:
                state.gain_prior = (found.gains * found.gain_counts, found.gain_counts)
                state.gain_sum += state.gain_prior[0]
                state.gain_count += found.gain_counts
            if self.prompt_probe:
                state.probe = np.ones(n, dtype=bool) if found is None else found.unknown
            self._created += 1
            self._states[req_id] = state
        return state

    def choose(self, state: RequestState) -> int:
        """The policy's arm for this step, counted as chosen and kept as ``last_arm``."""
        arm = self.policy.select(state.bandit)
        self.assign(state, arm)
        return arm

    def assign(self, state: RequestState, arm: int) -> None:
        """``arm`` drafts for the request this step (chosen by the caller)."""
        state.stats.chosen[arm] += 1
        self.totals.chosen[arm] += 1
        state.last_arm = arm

    def record(self, state: RequestState, arm: int, drafted: int, accepted: int,
               reward: float) -> None:
        """One verification of ``arm``'s drafts: statistics, then the bandit
        update unless the reward is NaN (nothing drafted: no information)."""
        for stats in (state.stats, self.totals):
            stats.drafted[arm] += drafted
            stats.accepted[arm] += accepted
        if math.isnan(reward):
            return
        reward = min(max(reward, 0.0), 1.0)  # float noise must not leave the policy's range
        for stats in (state.stats, self.totals):
            stats.reward_sum[arm] += reward
            stats.reward_count[arm] += 1
        self.policy.update(state.bandit, arm, reward)

    def free(self, req_id: str) -> RequestState | None:
        """Forget a finished/aborted request; returns its state (None if unknown)."""
        state = self._states.pop(req_id, None)
        if state is not None and self.warm_start:
            self.priors.observe(state.signature, state.stats.mean_rewards(), state.mean_gains())
        return state

    def free_missing(self, live_ids: set[str]) -> list[str]:
        """Free every request not in ``live_ids`` (a safety net if a finish
        notification was missed); returns the freed ids. O(live requests)."""
        gone = [r for r in self._states if r not in live_ids]
        for req_id in gone:
            self.free(req_id)
        return gone

    def reset_stats(self) -> None:
        self.totals = DrafterStats.zeros(self.policy.num_arms)

    def snapshot(self) -> dict:
        return {
            "live_requests": len(self._states),
            "live_request_ids": sorted(self._states),
            "drafters": self.totals.as_dict(self.arm_names),
        }
