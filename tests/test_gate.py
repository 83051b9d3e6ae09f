"""The speculation gate (core.gate): speculate or not per batch size, from measured tokens/s."""
import pytest

from vllm_metasd.core.gate import SpeculationGate


def run(gate, batch_size, steps, spec_rate, plain_rate, cohort=False):
    """``steps`` decisions at one batch size, each observed at the mode's rate;
    returns how many speculated."""
    spec = 0
    for _ in range(steps):
        s = gate.speculate(batch_size, cohort)
        spec += s
        rate = spec_rate if s else plain_rate
        gate.observe(batch_size, s, tokens=batch_size * 2, seconds=batch_size * 2 / rate,
                     cohort=cohort)
    return spec


def test_tries_both_modes_then_keeps_the_faster_and_still_explores():
    gate = SpeculationGate(min_batch=1, explore_every=10, min_samples=3, warmup=0, burst=1)
    # speculation first (min_samples), then plain (min_samples)
    assert [gate.speculate(16) for _ in range(1)] == [True]
    gate.observe(16, True, 32, 0.1)
    for _ in range(2):
        assert gate.speculate(16)
        gate.observe(16, True, 32, 0.1)  # 320 tokens/s
    for _ in range(3):
        assert not gate.speculate(16)
        gate.observe(16, False, 16, 0.04)  # 400 tokens/s: plain is faster
    assert gate.rate(16) == pytest.approx((400.0, 320.0))
    for _ in range(9):  # 4 * min_samples of the loser: its lead is trusted
        gate.observe(16, True, 32, 0.1)
    decisions = [gate.speculate(16) for _ in range(400)]
    # plain leads by 25%: the loser is explored once every 2 * 10 steps
    assert 18 <= sum(decisions) <= 22


def test_a_far_lead_is_checked_more_rarely():
    gate = SpeculationGate(min_batch=1, explore_every=10, min_samples=1, warmup=0)
    for _ in range(4):  # 4 * min_samples each: the lead is trusted
        gate.observe(1, True, 2, 0.01)  # 200 tokens/s
        gate.observe(1, False, 1, 0.01)  # 100
    decisions = [gate.speculate(1) for _ in range(840)]
    # a burst of 4 plain steps every 8 * 10 steps
    assert sum(not d for d in decisions) == 40
    assert "".join("p" if not d else "s" for d in decisions[:100]).count("pppp") == 1


def test_a_cold_start_is_forgotten_after_one_burst():
    """The first speculative steps of a cold engine are slow (every drafter is
    still being tried): plain steps win the first comparison, and the next
    exploration burst at speculation's real speed turns it back on."""
    gate = SpeculationGate(min_batch=1, explore_every=10, min_samples=4, warmup=0)
    for _ in range(4):
        assert gate.speculate(1)
        gate.observe(1, True, 1, 0.02)  # 50 tokens/s
    for _ in range(4):
        assert not gate.speculate(1)
        gate.observe(1, False, 1, 0.01)  # 100 tokens/s
    spec = run(gate, 1, 150, spec_rate=200, plain_rate=100)
    assert gate.rate(1)[1] > gate.rate(1)[0]
    # plain's lead (2x) is measured on 4 speculative samples only: re-checked
    # after 10 steps, not 80, and that burst turns speculation back on
    assert spec > 150 - 10 - 20


def test_batch_sizes_are_judged_apart():
    gate = SpeculationGate(min_batch=1, explore_every=20, min_samples=2, warmup=0)
    assert run(gate, 1, 200, spec_rate=150, plain_rate=100) > 180  # speculation pays
    assert run(gate, 16, 200, spec_rate=900, plain_rate=1200) < 30  # it does not
    assert run(gate, 24, 10, spec_rate=900, plain_rate=1200) <= 1  # same bucket as 16
    assert gate.rate(1)[1] > gate.rate(1)[0] and gate.rate(16)[0] > gate.rate(16)[1]
    snap = gate.snapshot()
    assert list(snap) == ["1", "16-31"]
    assert snap["16-31"]["plain_tokens_per_s"] == pytest.approx(1200.0, rel=1e-3)
    assert snap["16-31"]["plain_samples"] + snap["16-31"]["spec_samples"] == 210


def test_a_cohort_is_judged_apart():
    """The same batch size in a cohort (measured by its least-advanced
    request) and not: each decided by its own measurements."""
    gate = SpeculationGate(min_batch=1, explore_every=20, min_samples=2, warmup=0)
    assert run(gate, 16, 200, spec_rate=1500, plain_rate=1200) > 170
    assert run(gate, 16, 200, spec_rate=700, plain_rate=1200, cohort=True) < 30
    assert run(gate, 16, 50, spec_rate=1500, plain_rate=1200) > 40
    assert gate.rate(16, cohort=True)[1] == pytest.approx(700.0)
    snap = gate.snapshot()
    assert list(snap) == ["16-31", "16-31 cohort"]
    assert snap["16-31"]["spec_tokens_per_s"] == pytest.approx(1500.0, rel=1e-3)


def test_follows_a_change_in_the_machine_or_workload():
    gate = SpeculationGate(min_batch=1, explore_every=8, min_samples=2, warmup=0, decay=0.9)
    assert run(gate, 4, 100, spec_rate=300, plain_rate=200) > 80
    # speculation turns slow (e.g. the drafters stop matching): the explored
    # plain steps win, and the gate follows within a few hundred steps
    run(gate, 4, 300, spec_rate=100, plain_rate=200)
    assert run(gate, 4, 100, spec_rate=100, plain_rate=200) < 20


def test_starts_after_the_engines_first_speculative_steps():
    """The first ``warmup`` speculative steps (the bandits trying every drafter)
    are neither measured nor gated; plain steps before that are not counted."""
    gate = SpeculationGate(min_batch=1, explore_every=10, min_samples=2, warmup=3)
    for _ in range(3):
        assert gate.speculate(1)
        gate.observe(1, True, 1, 1.0)  # 1 token/s: a cold start, not measured
    assert gate.snapshot() == {}
    assert run(gate, 1, 100, spec_rate=150, plain_rate=100) > 80
    assert gate.rate(1)[1] == pytest.approx(150.0)


def test_a_lead_over_plain_steps_is_trusted_at_once():
    """Plain steps yield one token at a steady time: their min_samples are
    enough, and speculation's far lead means rare plain bursts at once."""
    gate = SpeculationGate(min_batch=1, explore_every=10, min_samples=2, warmup=0)
    spec = run(gate, 1, 200, spec_rate=200, plain_rate=100)
    assert 200 - spec == 2 + 2 * 4  # min_samples, then a burst at decisions 80 and 160


def test_small_batches_are_not_gated():
    """Below min_batch rows every step speculates (the per-row choice decides)
    and nothing is measured; from min_batch on the gate decides."""
    gate = SpeculationGate(explore_every=10, min_samples=2, warmup=0)
    assert run(gate, 1, 100, spec_rate=60, plain_rate=100) == 100
    assert run(gate, 3, 100, spec_rate=60, plain_rate=100) == 100
    assert gate.snapshot() == {}
    assert run(gate, 4, 100, spec_rate=60, plain_rate=100) < 20


def proposer_without_engine():
    from vllm_metasd.proposer import MetaSDProposer
    from vllm_metasd.telemetry import Telemetry

    p = object.__new__(MetaSDProposer)
    p.gate = SpeculationGate(min_batch=1, warmup=0)
    p.telemetry = Telemetry(["a"], 0)
    p._last_step, p._joined, p._cohort, p._least = None, False, False, 0
    return p


def test_the_engine_reports_every_speculative_step_but_the_first_after_plain_ones():
    # The proposer's rule (MetaSDProposer._end_step / _speculate), driven
    # without an engine: a speculative step right after plain ones pays its
    # drafters' catch-up on the plain steps' tokens (the gate's own switch) and
    # is not reported; every other step is, whatever its rows' drafters
    # caught up on; a step with a prompt probe is not.
    p = proposer_without_engine()
    reported = []
    p.gate.observe = lambda rows, speculated, tokens, seconds, cohort: reported.append(speculated)
    t = 100.0
    for speculated, probed in ((False, False), (True, False), (True, False), (True, True),
                               (True, False), (False, False), (True, False)):
        t += 0.01
        p._speculate(4, t, 8, True, 0)  # learns from the step before, then decides
        p._end_step([[]] * 4, speculated=speculated, start=t, probed=probed)
    # reported: the plain step, the second speculative one, the step after the
    # probe, the plain one; not the first speculative step after each plain one
    assert reported == [False, True, True, False]


def test_a_cohorts_step_yields_its_rows_times_its_least_advanced_requests_tokens():
    """In a cohort, a speculative step that gave 4 rows 1+3+3+3 tokens moved
    the batch's end one token closer: 4 tokens for the gate, not 10 (outside a
    cohort: its 10 tokens)."""
    reported = []
    for cohort in (True, False):
        p = proposer_without_engine()
        p.gate.observe = lambda rows, speculated, tokens, seconds, cohort: reported.append(
            (tokens, cohort))
        p._cohort = cohort
        t, least = 100.0, 5
        for tokens, advanced in ((4, 1), (10, 1), (10, 3), (12, 3)):  # (all rows', least's)
            t += 0.01
            least += advanced
            p._speculate(4, t, tokens, True, least)
            p._end_step([[1]] * 4, speculated=True, start=t)
    assert reported == [(4, True), (12, True), (12, True), (10, False), (10, False),
                        (12, False)]
