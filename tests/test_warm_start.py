"""The warm start: priors from finished requests with similar prompts (no vLLM)."""
import math

import numpy as np
import pytest

from vllm_metasd.core import RequestStateStore, StepController, UCBPolicy
from vllm_metasd.core.warm_start import WarmStart, prompt_signature

NAN = math.nan


def test_signature_is_a_unit_bag_of_tokens():
    a = prompt_signature(np.array([5, 7, 7, 9]))
    assert np.linalg.norm(a) == pytest.approx(1.0)
    assert np.array_equal(a, prompt_signature(np.array([7, 9, 5, 7])))  # order-free
    assert prompt_signature(np.array([1, 2, 3])) @ prompt_signature(np.array([4, 5])) == 0.0
    assert 0 < a @ prompt_signature(np.array([5, 7, 100])) < 1


def test_without_a_prompt_the_prior_is_the_mean_over_requests_of_their_means():
    w = WarmStart(3)
    assert w.prior(None, 2.0) is None
    w.observe(None, [0.2, NAN, 0.9], [1.0, NAN, NAN])
    w.observe(None, [0.4, NAN, NAN], [3.0, NAN, NAN])
    p = w.prior(None, 5.0)
    assert p.bandit.means == pytest.approx([0.3, 0.0, 0.9]) and p.bandit.counts == [5.0, 0.0, 5.0]
    assert p.gains.tolist() == [2.0, 0.0, 0.0] and p.gain_counts.tolist() == [5.0, 0.0, 0.0]
    assert p.unknown.tolist() == [False, True, False]  # nobody tried arm 1


def _prompts(lo, n, rng):
    """n prompts drawn from one "domain": tokens in [lo, lo + 50)."""
    return [rng.integers(lo, lo + 50, size=30) for _ in range(n)]


def test_a_new_request_starts_from_the_finished_requests_with_prompts_like_its_own():
    # Code-like prompts found arm 0 best, German-like ones arm 1; more German
    # ones finished, so the population's mean ranks arm 1 first.
    rng = np.random.default_rng(0)
    store = RequestStateStore(UCBPolicy(3), warm_start=True, prior_pseudo_count=2)
    finished = [(p, [0.9, 0.2]) for p in _prompts(0, 10, rng)]
    finished += [(p, [0.1, 0.8]) for p in _prompts(500, 20, rng)]
    for i in rng.permutation(len(finished)):
        prompt, rewards = finished[i]
        s = store.get_or_create(f"r{i}", prompt)
        for arm, r in enumerate(rewards):  # arm 2 never tried
            store.record(s, arm, 4, 0, r)
            s.observe_gain(arm, 4 * r)
        store.free(f"r{i}")
    code = store.get_or_create("code", _prompts(0, 1, rng)[0])
    assert code.bandit.sums[:2] == pytest.approx([1.8, 0.4])  # the 8 code-like ones' means, x2
    assert code.gain_sum[:2] / code.gain_count[:2] == pytest.approx([3.6, 0.8])
    assert code.bandit.counts == [2.0, 2.0, 0.0]  # arm 2: no prior, explored
    german = store.get_or_create("german", _prompts(500, 1, rng)[0])
    assert german.bandit.sums[:2] == pytest.approx([0.2, 1.6])
    unknown = store.get_or_create("unknown")  # no prompt: the population's mean
    assert unknown.bandit.sums[:2] == pytest.approx([2 * (9 + 2) / 30, 2 * (2 + 16) / 30])
    policy = store.policy
    for s in (code, german):
        s.bandit.counts[2] = 2.0  # arm 2 known bad: the prior's best is chosen
    assert (policy.select(code.bandit), policy.select(german.bandit)) == (0, 1)


def test_the_memory_keeps_the_latest_requests():
    w = WarmStart(1, memory=2, neighbours=1)
    for r in (0.1, 0.2, 0.3):
        w.observe(prompt_signature(np.array([1, 2])), [r], [NAN])
    assert len(w) == 2
    assert w.prior(None, 1.0).bandit.means == pytest.approx([0.25])


def test_the_controller_reads_the_prompt_of_new_requests_only():
    store = RequestStateStore(UCBPolicy(2), warm_start=True)
    ctl = StepController(store, k=4)
    read = []

    def prompt_of(row):
        read.append(row)
        return np.array([row, row + 1])

    assert ctl.begin(["a", "b"], np.array([True, True]), prompt_of).tolist() == [0, 1]
    assert ctl.begin(["a", "b", "c"], np.array([True, False, True]), prompt_of).tolist() == [2]
    assert read == [0, 1, 2]
    assert np.array_equal(store.get("c").signature, prompt_signature(np.array([2, 3])))
    cold = StepController(RequestStateStore(UCBPolicy(2)), k=4)  # no warm start: not needed
    cold.begin(["x"], np.array([True]), prompt_of)
    assert cold.store.get("x").signature is None


def test_an_arm_is_judged_by_the_most_similar_requests_that_tried_it():
    # Code-like prompts tried arms 0 and 1 only; two German-like ones also
    # tried arm 2 and found it poor: a new code-like request takes arm 2's
    # prior from them (the nearest that tried it) instead of exploring it.
    rng = np.random.default_rng(1)
    w = WarmStart(3, neighbours=4)
    for p in _prompts(0, 10, rng):
        w.observe(prompt_signature(p), [0.9, 0.5, NAN], [3.0, 1.0, NAN])
    for p in _prompts(500, 2, rng):
        w.observe(prompt_signature(p), [0.1, 0.6, 0.05], [0.0, 2.0, 0.1])
    code = prompt_signature(_prompts(0, 1, rng)[0])
    p = w.prior(code, 2.0)
    assert p.bandit.means == pytest.approx([0.9, 0.5, 0.05]) and p.bandit.counts == [2.0] * 3
    assert p.gains.tolist() == pytest.approx([3.0, 1.0, 0.1]) and p.gain_counts.tolist() == [2.0] * 3
    # ... but no request with a prompt like its own tried arm 2: with the
    # prompt probe, arm 2 gets no prior and is probed on the new prompt
    assert p.unknown.tolist() == [False, False, True]
    probed = w.prior(code, 2.0, probe=True)
    assert probed.bandit.counts == [2.0, 2.0, 0.0] and probed.gain_counts.tolist() == [2.0, 2.0, 0.0]
    assert probed.bandit.means == pytest.approx(p.bandit.means)


def test_with_the_probe_a_request_is_probed_by_the_arms_no_similar_request_tried():
    rng = np.random.default_rng(2)
    store = RequestStateStore(UCBPolicy(3), warm_start=True, prompt_probe=True)
    ctl = StepController(store, k=4)
    prompts = _prompts(0, 2, rng) + _prompts(500, 1, rng)
    ctl.begin(["first"], np.array([True]), lambda _r: prompts[0])
    assert ctl.to_probe(np.array([0])).tolist() == [[True] * 3]  # nothing remembered: all
    for arm in (0, 1):  # its probe observations count as tried
        ctl.probed(arm, np.array([0]), np.array([30]), np.array([2.0]))
    ctl.finished("first")
    new = ctl.begin(["code", "german"], np.array([True, True]), lambda r: prompts[1 + r])
    assert ctl.to_probe(new).tolist() == [[False, False, True], [True, True, True]]
    assert store.get("code").bandit.counts == [2.0, 2.0, 0.0]
    assert store.get("german").bandit.counts == [0.0] * 3
    plain = StepController(RequestStateStore(UCBPolicy(3), warm_start=True), k=4)
    plain.begin(["x"], np.array([True]), lambda _r: prompts[0])
    assert plain.to_probe(np.array([0])).tolist() == [[False] * 3]  # no prompt_probe
