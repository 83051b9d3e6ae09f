"""MetaSD through real vLLM CPU engines (tiny random-weight models)."""
import math
import time

import numpy as np
import pytest
from scipy import stats as sps

from conftest import PROMPTS, make_llm, metasd_config, stats


def greedy(llm, prompts=PROMPTS, max_tokens=24):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(plain_llm):
    return greedy(plain_llm)


@pytest.mark.parametrize("policy", [
    {"name": "ucb", "beta": 1.0}, {"name": "exp3", "gamma": 0.2},
    {"name": "discounted_ucb", "gamma": 0.9}, {"name": "sliding_window_ucb", "window": 8},
    {"name": "epsilon_greedy", "epsilon": 0.2}, {"name": "fixed", "arm": 0},
])
def test_greedy_equals_plain_decoding_for_every_policy(metasd4_llm, reference, policy):
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={"policy": policy})
    metasd4_llm.collective_rpc("metasd_reset_stats")
    assert greedy(metasd4_llm) == reference
    drafters = stats(metasd4_llm)["drafters"]
    chosen = {k: v["chosen"] for k, v in drafters.items()}
    assert sum(chosen.values()) > 0
    # Every choice is rewarded (an empty n-gram draft earns 0 at once), except
    # each request's last choice, whose draft is never verified.
    unrewarded = sum(v["chosen"] - v["reward_count"] for v in drafters.values())
    if policy["name"] == "fixed":  # learns nothing: no reward is computed at all
        assert set(k for k, v in chosen.items() if v) == {"bad1"}
        assert all(v["reward_count"] == 0 for v in drafters.values())
    else:
        assert 0 <= unrewarded <= len(PROMPTS)


def test_greedy_equals_plain_with_two_drafters(tiny_zoo, reference):
    cfg = metasd_config(tiny_zoo, ["good", "bad1"], {"name": "ucb", "beta": 1.0})
    llm = make_llm(tiny_zoo["target"], {"method": "metasd", "config": cfg})
    try:
        assert greedy(llm) == reference
        drafters = stats(llm)["drafters"]
        # The aligned drafter is the target's copy: every draft it made is accepted.
        assert drafters["good"]["drafted"] > 0
        assert drafters["good"]["accepted"] == drafters["good"]["drafted"]
        assert drafters["bad1"]["chosen"] > 0  # UCB tried it
    finally:
        del llm


@pytest.mark.parametrize("objective", ["alignment", "throughput"])
def test_prompt_probe_starts_on_the_drafter_that_agrees_with_the_prompt(metasd4_llm, plain_llm,
                                                                       objective):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # Prompts that end in the target's own greedy text: the aligned drafter
    # (the target's copy) agrees with it, the random ones do not.
    tok = plain_llm.get_tokenizer()
    seeds = [tok.encode(p) for p in PROMPTS[:8]]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    text = plain_llm.generate([TokensPrompt(prompt_token_ids=s) for s in seeds], params,
                              use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=s + list(o.outputs[0].token_ids))
               for s, o in zip(seeds, text)]
    short = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    reference = [list(o.outputs[0].token_ids)
                 for o in plain_llm.generate(prompts, short, use_tqdm=False)]
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
        "policy": {"name": "ucb", "beta": 1.0}, "objective": objective,
        "prompt_probe": True, "warm_start": False, "speculation_gate": False})
    metasd4_llm.collective_rpc("metasd_reset_stats")
    try:
        out = [list(metasd4_llm.generate([p], short, use_tqdm=False)[0].outputs[0].token_ids)
               for p in prompts]
        assert out == reference
        s = stats(metasd4_llm)
        assert s["phase_s"]["probe"] > 0
        first = {}
        for req_id, arm in metasd4_llm.collective_rpc("metasd_choices")[0]:
            first.setdefault(req_id, arm)
        if objective == "alignment":  # without the probe, UCB would try every arm first
            assert len(first) == len(prompts) and set(first.values()) == {"good"}
        else:  # the speed objective may also take the free n-gram arm, or not draft
            # (the "good" drafter is the target's copy: drafting k costs k target steps)
            assert first and set(first.values()) <= {"good", "lookup"}
    finally:
        metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
            "objective": "alignment", "prompt_probe": False, "speculation_gate": True})


def test_with_warm_start_the_probe_passes_only_for_drafters_no_similar_prompt_tried(
        metasd4_llm, plain_llm):
    """The first request is probed by every drafter (nothing remembered); a
    second one with the same prompt, once the first finished, by none (the
    first's probe counts as having tried them all)."""
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
        "prompt_probe": True, "warm_start": True, "speculation_gate": False})
    probe_s = []
    try:
        for _ in range(2):
            metasd4_llm.collective_rpc("metasd_reset_stats")
            assert greedy(metasd4_llm, PROMPTS[3:4], max_tokens=8) == greedy(
                plain_llm, PROMPTS[3:4], max_tokens=8)
            probe_s.append(stats(metasd4_llm)["phase_s"]["probe"])
        assert probe_s[0] > 0 and probe_s[1] == 0
    finally:
        metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
            "prompt_probe": False, "warm_start": False, "speculation_gate": True})


def _remembered_prompts(worker):
    """The warm start's memory of finished requests' prompt signatures."""
    priors = worker.model_runner.drafter.controller.store.priors
    return priors._signatures[:len(priors)].tolist()


def test_the_warm_start_remembers_each_finished_requests_own_prompt(metasd4_llm, plain_llm):
    """The proposer hands the warm start each new request's prompt from the
    runner's token buffer (its own batch row, whatever vLLM's row order): a
    batch of prompts of different lengths, then one more request (a request
    is forgotten on the step after it finished)."""
    from vllm import SamplingParams

    from vllm_metasd.core.warm_start import prompt_signature

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={"warm_start": True})
    try:
        outs = metasd4_llm.generate(PROMPTS[:6], params, use_tqdm=False)
        assert greedy(metasd4_llm, PROMPTS[6:7], max_tokens=4) == greedy(
            plain_llm, PROMPTS[6:7], max_tokens=4)
        remembered = np.array(metasd4_llm.collective_rpc(_remembered_prompts)[0])
        expected = np.stack([prompt_signature(np.array(o.prompt_token_ids)) for o in outs])
        assert len(remembered) >= len(expected)
        match = expected @ remembered[:len(expected)].T  # cosine similarities
        assert sorted(match.argmax(axis=1).tolist()) == list(range(len(expected)))
        np.testing.assert_allclose(match.max(axis=1), 1.0, atol=1e-5)
    finally:
        metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={"warm_start": False})


def test_speculation_gate_mixes_plain_steps_in_and_stays_exact(metasd4_llm, plain_llm):
    """Throughput objective with the gate: once both modes were measured at a
    batch size, plain steps (no drafts, no choice) alternate with speculative
    ones; greedy output stays the target's."""
    reference = greedy(plain_llm, PROMPTS, max_tokens=64)
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
        "policy": {"name": "ucb", "beta": 1.0}, "objective": "throughput"})
    metasd4_llm.collective_rpc("metasd_reset_stats")
    try:
        # the gate starts after the engine's first 32 speculative steps
        for _ in range(3):
            assert greedy(metasd4_llm, PROMPTS, max_tokens=64) == reference
        s = stats(metasd4_llm)
        assert s["plain_steps"] > 0
        assert sum(d["drafted"] for d in s["drafters"].values()) > 0
    finally:
        metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={"objective": "alignment"})


def test_idle_time_between_requests_is_not_counted_as_the_targets(metasd4_llm):
    """Batch 1 with pauses between requests (a quiet server): the step that
    starts a request after the engine sat idle must not teach the throughput
    objective that a target step takes the pause (it would then find drafting,
    which verifies k more tokens per row, never worth it)."""
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
        "policy": {"name": "ucb", "beta": 1.0}, "objective": "throughput"})
    try:
        for p in PROMPTS[:6]:
            greedy(metasd4_llm, [p], max_tokens=16)
            time.sleep(0.5)
        costs = stats(metasd4_llm)["cost_model"]
        # a step here takes milliseconds; counting the pauses made it ~500 ms
        assert 0 < costs["target_fixed_ms"] + 5 * costs["target_per_token_ms"] < 100, costs
        assert set(costs["arms"]) == {"bad1", "good", "bad2", "lookup"}
    finally:
        metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={"objective": "alignment"})


def test_one_reward_per_request_step_from_the_chosen_arm(metasd4_llm):
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={"policy": {"name": "fixed", "arm": 1}})
    metasd4_llm.collective_rpc("metasd_reset_stats")
    out = greedy(metasd4_llm, PROMPTS[:8], max_tokens=20)
    d = stats(metasd4_llm)["drafters"]
    good = d["good"]
    for name in ("bad1", "bad2", "lookup"):
        assert d[name]["chosen"] == 0 and d[name]["drafted"] == 0
    # Each choice is verified (and rewarded) on the next step, except the
    # choice made at each request's last step, which is never verified.
    assert good["chosen"] - len(out) <= good["drafted"] / 3 <= good["chosen"]
    assert good["accepted"] == good["drafted"]
    # A fixed policy learns nothing: no alignment reward is computed at all.
    assert good["reward_count"] == 0 and good["mean_reward"] is None


def test_bad_drafters_end_up_rarely_chosen(metasd4_llm):
    metasd4_llm.collective_rpc("metasd_reconfigure",
                               kwargs={"policy": {"name": "ucb", "beta": 1.0}})
    metasd4_llm.collective_rpc("metasd_reset_stats")
    max_tokens = 96
    greedy(metasd4_llm, PROMPTS, max_tokens=max_tokens)
    d = stats(metasd4_llm)["drafters"]
    total = sum(v["chosen"] for v in d.values())
    # Greedy batches score BD over each drafter's top-64 tokens (a lower bound
    # of 1 - TV): "good" (q = p) earns p's top-64 mass, a random drafter far
    # less; UCB keeps choosing a bad arm only while sqrt(beta ln t / n) > gap,
    # so at most 1 + ln(max_tokens) / gap^2 times per request (gap >= 0.5).
    good = d["good"]["mean_reward"]
    bound = len(PROMPTS) * (1 + 4 * math.log(max_tokens))
    for bad in ("bad1", "bad2"):
        assert d[bad]["mean_reward"] < good / 2
        assert d[bad]["chosen"] <= bound
        assert d[bad]["chosen"] / total < 0.2
    assert d["good"]["chosen"] / total > 0.5


def test_match_reward_scores_the_targets_copy_1_and_stays_exact(metasd4_llm, reference):
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
        "policy": {"name": "ucb", "beta": 1.0}, "reward": "match"})
    metasd4_llm.collective_rpc("metasd_reset_stats")
    try:
        assert greedy(metasd4_llm) == reference
        d = stats(metasd4_llm)["drafters"]
        # greedy: the target's copy always drafts the target's argmax
        assert d["good"]["reward_count"] > 0 and d["good"]["mean_reward"] == 1.0
        for bad in ("bad1", "bad2"):  # random weights: rarely the argmax
            assert d[bad]["reward_count"] > 0 and d[bad]["mean_reward"] < 0.5
    finally:
        metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={"reward": "bd"})


def test_states_freed_after_many_requests_and_abort(metasd4_llm):
    from vllm import SamplingParams

    greedy(metasd4_llm, [PROMPTS[i % 16] for i in range(500)], max_tokens=3)
    engine = metasd4_llm.llm_engine
    engine.add_request("to-abort", PROMPTS[0], SamplingParams(max_tokens=200, temperature=0))
    for _ in range(4):
        engine.step()
    aborted = lambda: [r for r in stats(metasd4_llm)["live_request_ids"]
                       if r.startswith("to-abort")]  # vLLM suffixes request ids
    assert len(aborted()) == 1
    engine.abort_request(["to-abort"])
    greedy(metasd4_llm, PROMPTS[:1], max_tokens=2)  # a step delivers the abort
    # Only the last request may remain: the runner hears of a finish on the next step.
    assert aborted() == [] and len(stats(metasd4_llm)["live_request_ids"]) <= 1


def _second_token_counts(llm, n, seed):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=1.0, seed=seed, n=n, ignore_eos=True)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    return [c.token_ids[1] for c in out.outputs]


@pytest.mark.parametrize("objective,probe", [("alignment", False), ("throughput", True)])
def test_sampling_distribution_matches_target(plain_llm, metasd4_llm, objective, probe):
    # The 2nd generated token is the first one verified by rejection sampling
    # (the 1st comes from prefill). Two-sample chi-square on its distribution.
    metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
        "policy": {"name": "exp3", "gamma": 0.5}, "objective": objective,
        "prompt_probe": probe, "speculation_gate": False})  # every step verifies drafts
    a = _second_token_counts(plain_llm, 600, seed=1)
    try:
        b = _second_token_counts(metasd4_llm, 600, seed=2)
    finally:
        metasd4_llm.collective_rpc("metasd_reconfigure", kwargs={
            "objective": "alignment", "prompt_probe": False, "speculation_gate": True})
    tokens = sorted(set(a) | set(b))
    table = np.array([[a.count(t) for t in tokens], [b.count(t) for t in tokens]])
    # Pool rare tokens so expected counts are >= 5.
    common = table.sum(0) >= 20
    pooled = np.column_stack([table[:, common], table[:, ~common].sum(1)])
    pooled = pooled[:, pooled.sum(0) > 0]
    assert pooled.shape[1] >= 2
    p_value = sps.chi2_contingency(pooled)[1]
    assert p_value > 0.001


def test_small_token_budget_with_chunked_prefill_stays_exact(tiny_zoo, plain_llm):
    """A token budget of 128 (= max_model_len) with ~60-token prompts: prefills
    are chunked, catch-ups share the drafter buffers, and the output is exact."""
    prompts = [" ".join([p] * 7) for p in PROMPTS[:6]]
    reference = greedy(plain_llm, prompts, max_tokens=24)
    cfg = metasd_config(tiny_zoo, ["good", "bad1"], {"name": "fixed", "arm": 0})
    llm = make_llm(tiny_zoo["target"], {"method": "metasd", "config": cfg},
                   max_num_batched_tokens=128, max_num_seqs=8, max_model_len=128)
    try:
        assert greedy(llm, prompts, max_tokens=24) == reference
        good = stats(llm)["drafters"]["good"]
        # The target's copy drafts exactly what the target says once caught up.
        assert good["drafted"] > 0 and good["accepted"] == good["drafted"]
    finally:
        del llm


def test_long_prompts_with_a_token_budget_far_below_them(tiny_zoo, plain_llm):
    """Token budget 64, ~300-token prompts (max_model_len 512): prefills are
    chunked, and a drafter first chosen several steps into a request catches
    up on its ~300 tokens in KV-filling passes of at most 64 tokens before it
    drafts. UCB tries bad1, bad2, then good: good is first chosen late. Half
    the prompts share a 250-token prefix (vLLM's prefix caching, on by
    default, hands the later ones cached blocks). Greedy output is exact."""
    long = " ".join(PROMPTS) * 6
    shared = long[:1700]
    prompts = [long[i * 40:i * 40 + 2000] for i in range(3)]
    prompts += [shared + tail for tail in ("def add(a, b):", " 12 + 30 =", " Der Hund")]
    reference = greedy(plain_llm, prompts, max_tokens=32)
    cfg = metasd_config(tiny_zoo, ["bad1", "bad2", "good"], {"name": "ucb", "beta": 1.0})
    llm = make_llm(tiny_zoo["target"], {"method": "metasd", "config": cfg},
                   max_num_batched_tokens=64, max_num_seqs=4)
    try:
        tokenizer = llm.get_tokenizer()
        assert min(len(tokenizer(p).input_ids) for p in prompts) > 250
        assert greedy(llm, prompts, max_tokens=32) == reference
        good = stats(llm)["drafters"]["good"]
        assert good["chosen"] > 0 and good["accepted"] == good["drafted"] > 0
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def test_bundled_zoo_serves_900_token_prompts_with_a_128_token_budget():
    """The zoo target's full context (1024) with a budget of 128 tokens: every
    drafter catches up on ~900 tokens in passes of at most 128."""
    from vllm_metasd import zoo

    if not zoo.available():
        pytest.skip("bundled zoo weights not present")
    prompts = [p["prompt"] for p in zoo.load_prompts()]
    text = [" ".join(prompts[i::2])[:4000] for i in range(2)]
    plain = make_llm(zoo.target_path(), max_model_len=1024, dtype="float32")
    try:
        tok = plain.get_tokenizer()
        text = [tok.decode(tok(t).input_ids[:900]) for t in text]
        reference = greedy(plain, text, max_tokens=16)
    finally:
        plain.llm_engine.engine_core.shutdown()
        del plain
    cfg = zoo.default_metasd_config()
    cfg["policy"] = {"name": "ucb", "beta": 1.0}
    cfg["warm_start"] = False
    llm = make_llm(zoo.target_path(), {"method": "metasd", "config": cfg}, max_model_len=1024,
                   max_num_batched_tokens=128, dtype="float32")
    try:
        assert greedy(llm, text, max_tokens=16) == reference
        assert sum(d["chosen"] for d in stats(llm)["drafters"].values()) > 0
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
