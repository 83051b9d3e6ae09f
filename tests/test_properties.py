"""Property-based tests (hypothesis) on the MetaSD core: rewards, policies, state.

For arbitrary distributions, drafts, partial draft lengths, arm counts, reward
sequences and request interleavings: rewards stay in [0, 1] (NaN only for a
row with nothing drafted), policies only ever select a valid arm, and the
state store frees everything it creates.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vllm_metasd import feedback
from vllm_metasd.core import (
    POLICIES, ArmPrior, RequestStateStore, StepController, acceptance_reward, bd_reward,
    make_policy, segment_mean,
)

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- rewards ---------------------------------------------------------------------


@st.composite
def draft_batches(draw):
    """A flattened batch as vLLM hands it to the rejection sampler: per-row
    draft counts (0 = nothing drafted, < k = partial), token ids, and target /
    drafter distributions (possibly one-hot, uniform or with exact zeros)."""
    vocab = draw(st.integers(2, 40))
    k = draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(0, k), min_size=1, max_size=8))
    total = sum(counts)
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))

    def dist(kind):
        if kind == "onehot":
            out = torch.zeros(total, vocab)
            out[torch.arange(total), torch.randint(0, vocab, (total,), generator=g)] = 1.0
            return out
        if kind == "uniform":
            return torch.full((total, vocab), 1.0 / vocab)
        scale = {"peaked": 30.0, "soft": 1.0}[kind]
        logits = torch.randn(total, vocab, generator=g) * scale
        if draw(st.booleans()):  # exact zeros, as after top-k / top-p
            logits[torch.rand(total, vocab, generator=g) < 0.5] = -math.inf
            logits[:, 0] = 0.0
        return logits.softmax(-1)

    kinds = st.sampled_from(["onehot", "uniform", "peaked", "soft"])
    p, q = dist(draw(kinds)).to(dtype), dist(draw(kinds)).to(dtype)
    drafts = torch.randint(0, vocab, (total,), generator=g)
    cu = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    return dict(p=p, q=q, drafts=drafts, cu=cu, counts=counts, vocab=vocab, k=k, g=g)


def assert_rewards(r, counts):
    assert r.shape == (len(counts),) and r.dtype == torch.float32
    for value, n in zip(r.tolist(), counts):
        if n == 0:
            assert math.isnan(value)
        else:
            assert 0.0 <= value <= 1.0, value


@FAST
@given(draft_batches())
def test_every_reward_is_in_unit_interval_or_nan_for_empty_rows(b):
    logits = (b["p"].float() + 1e-9).log()
    assert_rewards(bd_reward(b["drafts"], b["q"], logits, b["cu"]), b["counts"])
    assert_rewards(bd_reward(b["drafts"], None, logits, b["cu"]), b["counts"])
    values = torch.rand(len(b["drafts"]), generator=b["g"])
    assert_rewards(segment_mean(values, b["cu"]), b["counts"])


@FAST
@given(st.lists(st.tuples(st.integers(0, 16), st.integers(0, 16)), min_size=1, max_size=16))
def test_acceptance_reward_in_unit_interval(pairs):
    drafted = torch.tensor([d for d, _ in pairs])
    accepted = torch.minimum(torch.tensor([a for _, a in pairs]), drafted)
    assert_rewards(acceptance_reward(accepted, drafted), drafted.tolist())


@FAST
@given(draft_batches(), st.sampled_from(["bd", "acceptance"]), st.data())
def test_verification_feedback_rewards_in_unit_interval(b, kind, data):
    """The path vLLM's rejection sampler drives: arbitrary logits (any
    temperature, -inf from top-k/top-p), drafter q present or not, and any
    rejection-sampler output (-1 = empty slot)."""
    n_rows, k, vocab = len(b["counts"]), b["k"], b["vocab"]
    logits = (b["p"].float() + 1e-9).log() * data.draw(st.floats(0.1, 10.0))
    draft_probs = b["q"].float() if data.draw(st.booleans()) else None
    emitted = torch.tensor([data.draw(st.integers(1, n + 1)) for n in b["counts"]])
    output = torch.full((n_rows, k + 1), -1)
    for row, m in enumerate(emitted.tolist()):
        output[row, :m] = torch.randint(0, vocab, (m,), generator=b["g"])
    drafts = b["drafts"].clone()
    if data.draw(st.booleans()):  # vLLM's -1 placeholders (resumed after preemption)
        drafts[torch.rand(len(drafts), generator=b["g"]) < 0.5] = -1
    with feedback.capture(kind) as v:
        feedback.observe_drafts(drafts, b["counts"], b["cu"], draft_probs, logits)
        feedback.observe_output(output)
    assert_rewards(v.rewards, b["counts"])
    assert ((0 <= v.num_accepted) & (v.num_accepted <= v.num_drafted)).all()


# ---- policies --------------------------------------------------------------------

POLICY_PARAMS = {
    "ucb": dict(beta=st.floats(1e-3, 100.0)),
    "exp3": dict(gamma=st.floats(1e-3, 1.0), eta=st.none() | st.floats(1e-3, 10.0),
                 alpha=st.floats(0.0, 1.0)),
    "discounted_ucb": dict(beta=st.floats(1e-3, 100.0), gamma=st.floats(1e-3, 1.0)),
    "sliding_window_ucb": dict(beta=st.floats(1e-3, 100.0), window=st.integers(1, 20)),
    "epsilon_greedy": dict(epsilon=st.floats(0.0, 1.0)),
    "fixed": {},
}
assert set(POLICY_PARAMS) == set(POLICIES)  # a new policy must be added here


@st.composite
def policies(draw):
    name = draw(st.sampled_from(sorted(POLICIES)))
    num_arms = draw(st.integers(1, 12))
    params = {key: draw(s) for key, s in POLICY_PARAMS[name].items()}
    if name == "fixed":
        params["arm"] = draw(st.integers(0, num_arms - 1))
    return make_policy(name, num_arms, seed=draw(st.integers(0, 2**31)), **params)


unit = st.floats(0.0, 1.0)


@FAST
@given(policies(), st.lists(unit, max_size=120), st.booleans(), st.data())
def test_policies_only_select_valid_arms(policy, rewards, with_prior, data):
    n = policy.num_arms
    prior = None
    if with_prior:
        prior = ArmPrior(data.draw(st.lists(unit, min_size=n, max_size=n)),
                         data.draw(st.lists(st.floats(0.0, 50.0), min_size=n, max_size=n)))
    state = policy.new_state(prior, state_seed=data.draw(st.integers(0, 1000)))
    for r in rewards:
        arm = policy.select(state)
        assert type(arm) is int and 0 <= arm < n
        policy.update(state, arm, r)
        assert all(math.isfinite(x) for x in state.counts + state.sums)
    assert 0 <= policy.select(state) < n


@FAST
@given(policies(), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=60))
def test_store_keeps_any_reported_reward_in_range(policy, rewards):
    """Whatever float the feedback reports (NaN, inf, < 0, > 1), the policy
    only ever sees rewards in [0, 1] and keeps selecting valid arms."""
    store = RequestStateStore(policy)
    state = store.get_or_create("r")
    for r in rewards:
        arm = store.choose(state)
        assert 0 <= arm < policy.num_arms
        store.record(state, arm, 4, 2, r)
    means = [m for m in state.stats.mean_rewards() if not math.isnan(m)]
    assert all(0.0 <= m <= 1.0 for m in means)
    assert sum(state.stats.reward_count) == sum(not math.isnan(r) for r in rewards)


# ---- state store: arbitrary interleavings -------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """The step controller's ledgers under create / step / finish / preempt /
    free_missing in any order, against a model (a set of live ids): finishing
    everything leaves no ledger behind."""

    def __init__(self):
        super().__init__()
        self.ctl: StepController
        self.live: set[str] = set()
        self.choices = 0

    @initialize(policy=policies(), warm=st.booleans())
    def start(self, policy, warm):
        self.ctl = StepController(RequestStateStore(policy, warm_start=warm))
        self.store = self.ctl.store

    @rule(rid=st.integers(0, 15).map(str))
    def create(self, rid):
        self.store.get_or_create(rid)
        self.live.add(rid)

    @rule(rid=st.integers(0, 15).map(str), reward=st.floats(allow_nan=True),
          drafted=st.integers(0, 5))
    def step(self, rid, reward, drafted):
        """One engine step of a request (created on first use, as in propose)."""
        arm = int(self.ctl.choose([rid], np.array([True]))[0])
        self.live.add(rid)
        self.choices += 1
        assert 0 <= arm < self.store.policy.num_arms
        self.ctl.mark_caught_up(arm, np.array([0]), np.array([drafted + 10]))
        self.ctl.drafted(arm, np.array([0]), np.array([drafted]))
        self.ctl.observe([rid], [drafted], [min(drafted, 2)], [reward])

    @rule(rid=st.integers(0, 15).map(str))
    def finish(self, rid):
        """Finished or aborted (also for an id never seen: a no-op)."""
        known = self.store.get(rid) is not None
        self.ctl.finished(rid)
        assert known == (rid in self.live)
        self.live.discard(rid)

    @rule(keep=st.sets(st.integers(0, 15).map(str)))
    def free_missing(self, keep):
        gone = self.store.free_missing(keep)
        assert set(gone) == self.live - keep
        self.live &= keep

    @rule(rid=st.integers(0, 15).map(str))
    def preempt(self, rid):
        self.ctl.preempted_request(rid)  # KV gone; the bandit stays
        state = self.store.get(rid)
        assert state is None or (not state.computed and state.last_arm is None)

    @invariant()
    def matches_model(self):
        assert len(self.store) == len(self.live)
        snap = self.store.snapshot()
        assert snap["live_request_ids"] == sorted(self.live)
        assert sum(d["chosen"] for d in snap["drafters"].values()) == self.choices

    def teardown(self):
        for rid in list(self.live):
            self.ctl.finished(rid)
        assert len(self.store) == 0 and not self.store._states


TestStoreInterleavings = StoreMachine.TestCase
TestStoreInterleavings.settings = settings(max_examples=100, stateful_step_count=40,
                                           deadline=None)


def test_policy_strategies_cover_every_policy():
    seen = set()

    @settings(max_examples=200, deadline=None)
    @given(policies())
    def collect(policy):
        seen.add(policy.name)

    collect()
    assert seen == set(POLICIES)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
