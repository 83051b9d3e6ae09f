"""Scale-out: MetaSD replicas as Ray actors, and tensor parallel 2 (real vLLM CPU engines).

Greedy outputs must equal plain TP=1 decoding (the session ``plain_llm``) in both.
"""
import gc
from pathlib import Path

import pytest

from conftest import metasd_config

PROMPTS = ["def add(a, b):", "The quick brown fox", "SELECT name, value FROM",
           "12 + 30 =", "Der schnelle braune"]
MAX_TOKENS = 20


def _params(temperature=0.0, seed=None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed,
                          ignore_eos=True)


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def reference(plain_llm):
    return _tokens(plain_llm.generate(PROMPTS, _params(), use_tqdm=False))


def test_two_ray_replicas_match_plain_decoding(tiny_zoo, reference, local_ray):
    from vllm_metasd import ray_replicas

    cfg = metasd_config(tiny_zoo, ["good", "bad1", "lookup"], {"name": "ucb", "beta": 1.0})
    replicas = ray_replicas.start_replicas(
        tiny_zoo["target"], {"method": "metasd", "config": cfg}, 2,
        enforce_eager=True, max_model_len=512, max_num_seqs=16, seed=0)
    try:
        info = local_ray.get([r.process_info.remote() for r in replicas])
        # The plugin's patches are applied inside each actor process, and each
        # replica's worker is bound to its own core.
        assert len({i["pid"] for i in info}) == 2
        for i in info:
            assert {"speculative_config", "model_runner", "rejection_sampler",
                    "worker"} <= set(i["patches"])
        assert sorted(i["omp_threads_bind"] for i in info) == ["0", "1"]

        outputs, stats = ray_replicas.generate(replicas, PROMPTS, _params())
        assert [o.prompt for o in outputs] == PROMPTS
        assert _tokens(outputs) == reference

        # Per-replica MetaSD statistics (from the engine workers: the patches
        # are live there too), merged.
        per_replica = [s[0] for s in local_ray.get(
            [r.rpc.remote("metasd_stats") for r in replicas])]
        assert all(s is not None and s["steps"] > 0 for s in per_replica)
        assert stats["replicas"] == 2 and stats["ranks_agree"]
        for name in ("good", "bad1", "lookup"):
            assert stats["drafters"][name]["chosen"] == sum(
                s["drafters"][name]["chosen"] for s in per_replica)
        good = stats["drafters"]["good"]
        assert good["drafted"] > 0 and good["accepted"] == good["drafted"]
        assert stats["drafters"]["bad1"]["chosen"] > 0  # UCB tried it on each replica
        assert stats["steps"] == sum(s["steps"] for s in per_replica)
        # Round-robin: both replicas worked (3 + 2 prompts).
        assert all(s["arm_choices"]["count"] > 0 for s in per_replica)
    finally:
        ray_replicas.shutdown_replicas(replicas)


def test_merge_stats_sums_and_recomputes_rates():
    from vllm_metasd.ray_replicas import merge_stats

    def rank(chosen, drafted, accepted, count, mean, digest="d"):
        return {"drafters": {"a": {"chosen": chosen, "drafted": drafted, "accepted": accepted,
                                   "reward_count": count, "reward_sum": mean * count}},
                "steps": 3, "overhead_s": 0.5, "live_requests": 0,
                "arm_choices": {"count": chosen, "digest": digest}}

    merged = merge_stats([[rank(2, 6, 3, 2, 0.5), rank(2, 6, 3, 2, 0.5)],
                          [rank(4, 12, 12, 4, 1.0)]])
    a = merged["drafters"]["a"]
    assert (a["chosen"], a["drafted"], a["accepted"], a["reward_count"]) == (6, 18, 15, 6)
    assert a["acceptance_rate"] == pytest.approx(15 / 18)
    assert a["mean_reward"] == pytest.approx((0.5 * 2 + 1.0 * 4) / 6)
    assert merged["steps"] == 6 and merged["ranks_agree"]
    assert not merge_stats([[rank(2, 6, 3, 2, 0.5, "x"), rank(2, 6, 3, 2, 0.5, "y")]])[
        "ranks_agree"]


def test_default_cpu_binds_give_each_worker_its_own_core():
    from vllm_metasd.ray_replicas import default_cpu_binds

    assert default_cpu_binds(2, cores=[0, 1]) == ["0", "1"]
    assert default_cpu_binds(2, 2, cores=[0, 1, 2, 3]) == ["0|1", "2|3"]
    assert default_cpu_binds(3, cores=[4, 5]) == ["4", "5", "4"]


@pytest.fixture(scope="module")
def tp2_llm(tiny_zoo, tmp_path_factory):
    """TP=2 MetaSD engine: the aligned drafter, a badly aligned one (2 heads, so
    it shards over 2 ranks like the target) and prompt lookup."""
    from conftest import make_llm
    from vllm_metasd.testing import make_llama

    bad = make_llama(tmp_path_factory.mktemp("tp") / "bad_tp",
                     Path(tiny_zoo["target"]).parent / "tokenizer", layers=1, hidden=128,
                     seed=3)
    cfg = metasd_config({**tiny_zoo, "bad": str(bad)}, ["bad", "good", "lookup"],
                        {"name": "exp3", "gamma": 0.5})
    mp = pytest.MonkeyPatch()
    # One core per TP rank (vLLM's auto binding wants one NUMA node per rank).
    mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    try:
        llm = make_llm(tiny_zoo["target"], {"method": "metasd", "config": cfg},
                       tensor_parallel_size=2)
    finally:
        mp.undo()
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.mark.parametrize("policy", [
    {"name": "exp3", "gamma": 0.5}, {"name": "epsilon_greedy", "epsilon": 0.3},
    {"name": "ucb", "beta": 1.0},
])
def test_tp2_greedy_equals_plain_and_ranks_agree(tp2_llm, reference, policy):
    tp2_llm.collective_rpc("metasd_reconfigure", kwargs={"policy": policy})
    tp2_llm.collective_rpc("metasd_reset_stats")
    assert _tokens(tp2_llm.generate(PROMPTS, _params(), use_tqdm=False)) == reference
    ranks = tp2_llm.collective_rpc("metasd_stats")
    assert len(ranks) == 2
    # Same arms, same order, on both ranks (a running hash of (step, request, arm)).
    assert ranks[0]["arm_choices"] == ranks[1]["arm_choices"]
    assert ranks[0]["arm_choices"]["count"] > 0
    assert ranks[0]["drafters"] == ranks[1]["drafters"]
    # Both draft LMs drafted on every rank (their TP shards are loaded there).
    for r in ranks:
        for name in ("bad", "good"):
            assert r["drafters"][name]["drafted"] > 0
        assert r["drafters"]["good"]["accepted"] == r["drafters"]["good"]["drafted"]


def test_tp2_ranks_agree_when_sampling(tp2_llm):
    # Random sampling draws from the global torch RNG (drafter and target) and
    # EXP3 from its per-request generator: both ranks must stay in lockstep.
    tp2_llm.collective_rpc("metasd_reconfigure",
                           kwargs={"policy": {"name": "exp3", "gamma": 0.5}})
    tp2_llm.collective_rpc("metasd_reset_stats")
    out = tp2_llm.generate(PROMPTS, _params(temperature=1.0, seed=7), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in out)
    ranks = tp2_llm.collective_rpc("metasd_stats")
    assert ranks[0]["arm_choices"] == ranks[1]["arm_choices"]
    assert ranks[0]["arm_choices"]["count"] > 0
    assert len({name for name, d in ranks[0]["drafters"].items() if d["chosen"]}) >= 2
