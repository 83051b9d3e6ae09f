"""The offline replay tool (benchmarks/replay.py) on synthetic traces: pure numpy."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import replay  # noqa: E402


def test_lm_outcomes_accepted_length_and_bd():
    match = np.array([1, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    acc, bd = replay.lm_outcomes(match, 4)
    assert acc.tolist() == [2, 1, 0, 4, 3, 2, 1, 0]
    assert bd[0] == 0.75 and bd[3] == 1.0 and bd[6] == 0.5  # partial window at the end


def ngram_draft(history: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """What the engine's n-gram arm drafts after ``history``, one history at a
    time (the reference the batched scorers are checked against)."""
    from vllm_metasd.arms import propose_ngrams

    ids, num = np.zeros((1, k), dtype=np.int32), np.zeros(1, dtype=np.int32)
    propose_ngrams(np.zeros(1, dtype=np.int64), np.array([len(history)], dtype=np.int32),
                   history.astype(np.int32)[None], min_n, max_n, len(history) + k, k, ids, num)
    return ids[0, :num[0]].astype(history.dtype)


def leading_run(match: np.ndarray) -> int:
    miss = np.flatnonzero(~match)
    return int(miss[0]) if len(miss) else len(match)


def test_ngram_draft_is_vllms_matcher():
    # vLLM 0.32's matcher continues the EARLIEST occurrence of the longest
    # matching suffix ("5 6" first at 0: 7 8 1), as the engine's n-gram arm does.
    h = np.array([5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6])
    assert ngram_draft(h, 3, 1, 2).tolist() == [7, 8, 1]
    assert ngram_draft(np.array([1, 2, 3]), 3, 1, 2).tolist() == []


def test_ngram_outcomes_are_each_positions_draft_scored_against_what_follows():
    rng = np.random.default_rng(2)
    for _ in range(20):
        prompt, y = rng.integers(0, 4, 24), rng.integers(0, 4, 30)
        acc, bd, drafted = replay.ngram_outcomes(prompt, y, 4, 2, 4)
        seq = np.concatenate([prompt, y])
        for t in range(len(y)):  # each position's draft, one at a time
            d = ngram_draft(seq[:len(prompt) + t], 4, 2, 4)
            truth = y[t:t + len(d)]
            match = d[:len(truth)] == truth
            assert drafted[t] == len(match)
            assert acc[t] == (leading_run(match) if len(match) else 0)
            assert bd[t] == pytest.approx(match.mean() if len(match) else 0.0)
        assert drafted.any()


def test_the_engines_ngram_matcher_is_vllms_batch_matcher():
    from vllm.v1.spec_decode.ngram_proposer import batch_propose_numba

    from vllm_metasd.arms import propose_ngrams

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, (16, 64)).astype(np.int32)  # a small vocabulary: many matches
    seq_lens = rng.integers(1, 64, 16).astype(np.int32)
    rows = np.array([0, 3, 4, 7, 9, 15])
    for min_n, max_n, k in ((1, 2, 3), (2, 4, 4), (3, 3, 5)):
        got = np.zeros((16, k), np.int32), np.zeros(16, np.int32)
        want = np.zeros((16, k), np.int32), np.zeros(16, np.int32)
        propose_ngrams(rows, seq_lens, tokens, min_n, max_n, 64, k, *got)
        batch_propose_numba(rows.tolist(), seq_lens, tokens, min_n, max_n, 64, k, *want)
        assert (got[1] == want[1]).all() and (got[0] == want[0]).all()
        assert got[1][rows].any()



def test_the_draft_lms_greedy_token_is_vllms_argmax_ties_included():
    import torch

    from vllm_metasd.arms import first_max

    g = torch.Generator().manual_seed(0)
    for vocab in (7, 4096, 49152):  # few values: many ties, the first maximal index wins
        logits = torch.randint(0, 3, (33, vocab), generator=g).to(torch.bfloat16)
        logits[:, -1] = logits.max()  # a tie with the last index in every row
        assert torch.equal(first_max(logits), logits.argmax(dim=-1))
        assert torch.equal(first_max(logits.float()), logits.float().argmax(dim=-1))


def test_the_lookups_prompt_probe_is_what_its_drafts_would_have_had_accepted():
    from vllm_metasd.arms import lookup_probe

    assert np.isnan(lookup_probe(np.arange(20), 32, 4, 2, 4, 1024))  # proposes nowhere
    assert lookup_probe(np.array([1, 2, 3, 4] * 6), 32, 4, 2, 4, 1024) == 4.0
    rng = np.random.default_rng(1)
    for _ in range(20):  # against each position's draft, one at a time
        tokens = rng.integers(0, 4, 40)
        runs, cut = [], []
        for e in range(len(tokens) - 1 - 16, len(tokens) - 1):
            d = ngram_draft(tokens[:e], 4, 2, 4)
            if len(d):
                truth = tokens[e:e + len(d)]
                match = d[:len(truth)] == truth
                (runs if e + 4 <= len(tokens) else cut).append(leading_run(match))
        want = np.mean(runs or cut) if runs or cut else np.nan
        np.testing.assert_allclose(lookup_probe(tokens, 16, 4, 2, 4, 1024), want)

def synthetic_trace(L=60, prompts=12, seed=0):
    """Arm i is perfect on prompts of domain i (i < 2) and useless elsewhere;
    arm 2 accepts one token everywhere."""
    rng = np.random.default_rng(seed)
    n = L * prompts
    acc = np.zeros((3, n), dtype=np.int8)
    bd = np.zeros((3, n), dtype=np.float32)
    for p in range(prompts):
        sl = slice(p * L, (p + 1) * L)
        acc[p % 2, sl], bd[p % 2, sl] = 4, 1.0
        acc[2, sl], bd[2, sl] = 1, rng.uniform(0.3, 0.4, L)
    return {"acc": acc, "bd": bd, "drafted": np.full((3, n), 4, np.int8),
            "offsets": np.arange(prompts + 1) * L, "arms": np.array(["a", "b", "c"]),
            "domains": np.array(["x", "y"] * (prompts // 2))}


def test_fixed_arm_steps_and_oracle():
    trace = synthetic_trace()
    fixed = replay.fixed_arm_steps(trace)
    # perfect arm: 59 tokens after prefill in steps of 5 -> 12 steps; 1-accept arm: 30.
    assert fixed[0, 0] == 12 and fixed[1, 1] == 12 and fixed[2, 0] == 30
    assert fixed[1, 0] == 59  # nothing accepted: one token per step


def test_ucb_replay_approaches_the_oracle_and_beats_every_single_arm():
    trace = synthetic_trace()
    fixed = replay.fixed_arm_steps(trace)
    s = replay.summarize(trace, replay.replay(trace, {"name": "ucb", "beta": 0.3}), fixed)
    assert s["mean_accepted_len"] > s["best_single_mean_accepted_len"]
    assert s["mean_accepted_len"] >= 0.8 * s["oracle_mean_accepted_len"]
    assert s["regret_steps"] >= 0


def test_prompt_probe_in_replay_cuts_exploration():
    # Each prompt's own domain arm agrees with its prompt; the others do not.
    trace = synthetic_trace()
    prompts = len(trace["offsets"]) - 1
    trace["arms"] = np.array(["a", "b", "lookup"])
    trace["probe"] = np.zeros((3, prompts), np.float32)
    trace["probe"][np.arange(prompts) % 2, np.arange(prompts)] = 0.9
    fixed = replay.fixed_arm_steps(trace)
    policy = {"name": "ucb", "beta": 0.3}
    blind = replay.summarize(trace, replay.replay(trace, policy), fixed)
    probed = replay.summarize(trace, replay.replay(trace, policy, probe=True), fixed)
    assert probed["regret_steps"] < blind["regret_steps"]
    first = replay.replay(trace, policy, probe=True, keep_choices=True)["choices"]
    assert [c[0] for c in first] == [p % 2 for p in range(prompts)]


def test_throughput_replay_trades_acceptance_for_speed():
    """The throughput objective through the engine's controller, on modelled
    step times: a free lookup that accepts one token beats draft LMs that
    accept all four when the LMs' forwards are slow, and not when they are
    cheap; either way it is at least as fast as choosing by alignment."""
    trace = synthetic_trace()
    trace["arms"] = np.array(["a", "b", "lookup"])
    tokens = (np.diff(trace["offsets"]) - 1).sum()
    policy = {"name": "ucb", "beta": 0.1}
    for lm_s, lookup_wins in ((0.05, True), (0.001, False)):
        times = replay.StepTimes(plain_s=0.01, verify_s=0.001, lm_s=lm_s)
        by_speed = replay.replay(trace, policy, objective="throughput", times=times,
                                 keep_choices=True, warm_start=True)
        by_alignment = replay.replay(trace, policy, times=times, warm_start=True)
        picks = np.concatenate([c[5:] for c in by_speed["choices"]])  # past the first tries
        assert (np.mean(picks == 2) > 0.8) == lookup_wins
        assert tokens / by_speed["seconds"].sum() >= 0.97 * tokens / by_alignment["seconds"].sum()


def test_step_times_from_benchmark_figures(tmp_path):
    def e(method, tps, acc):
        return {"pool": "default", "method": method, "tokens_per_s_bs1": tps,
                "mean_accepted_len": acc}
    figures = [e("none", 100.0, 0.0), e("ngram", 100.0, 0.1), e("draft:general", 150.0, 2.0),
               {**e("draft:general", 1.0, 0.0), "pool": "paper"}]  # other pools: ignored
    (tmp_path / "selection.json").write_text(json.dumps({"methods": figures}))
    batch1 = [{"method": f["method"], "tokens_per_s": f["tokens_per_s_bs1"],
               "mean_accepted_len": f["mean_accepted_len"]} for f in figures[:3]]
    (tmp_path / "batch1.json").write_text(json.dumps({"methods": batch1}))
    for name in ("selection.json", "batch1.json"):
        t = replay.StepTimes.from_results(tmp_path / name)
        # plain 10 ms per token; n-gram 11 ms per step (1 ms verifying); general 20 ms
        assert (t.plain_s, t.verify_s, t.lm_s) == pytest.approx((0.010, 0.001, 0.009))
