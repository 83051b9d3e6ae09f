"""The offline replay tool (benchmarks/replay.py) on synthetic traces: pure numpy."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import replay  # noqa: E402


def test_lm_outcomes_accepted_length_and_bd():
    match = np.array([1, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    acc, bd = replay.lm_outcomes(match, 4)
    assert acc.tolist() == [2, 1, 0, 4, 3, 2, 1, 0]
    assert bd[0] == 0.75 and bd[3] == 1.0 and bd[6] == 0.5  # partial window at the end


def test_ngram_draft_is_vllms_matcher():
    # vLLM 0.32's matcher continues the EARLIEST occurrence of the longest
    # matching suffix ("5 6" first at 0: 7 8 1), as the engine's n-gram arm does.
    h = np.array([5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6])
    assert replay.ngram_draft(h, 3, 1, 2).tolist() == [7, 8, 1]
    assert replay.ngram_draft(np.array([1, 2, 3]), 3, 1, 2).tolist() == []


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
