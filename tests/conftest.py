"""Shared fixtures: a tiny random-weight zoo and real vLLM CPU engines.

Engines are expensive (~15 s each), so they are session-scoped and shared;
tests switch MetaSD policies at runtime (``metasd_reconfigure``) instead of
starting new engines.
"""
import gc
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Tests read a proposer's state with collective_rpc(function), which vLLM
# refuses to serialize without this.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

PROMPTS = [
    "def add(a, b):", "The quick brown fox", "SELECT name, value FROM", "Der schnelle braune",
    "12 + 30 =", "    return a", "jumps over the", "WHERE id = 42;", "Fuchs springt über",
    "7 * 6 =", "def", "The lazy dog.", "FROM items", "den faulen Hund", "42. 7", "a + b",
]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    from vllm_metasd.testing import make_tiny_zoo

    return make_tiny_zoo(tmp_path_factory.mktemp("tinyzoo"))


def make_llm(target, speculative_config=None, **kwargs):
    from vllm import LLM

    kwargs.setdefault("max_num_seqs", 16)
    kwargs.setdefault("max_model_len", 512)
    return LLM(model=target, enforce_eager=True, seed=0,
               speculative_config=speculative_config, **kwargs)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for one test module (Ray tests: test_scale, test_ray_llm)."""
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    # Ray's memory monitor kills actors when the *node* is near full, counting
    # other processes too (parallel test sessions on a shared CI machine).
    mp.setenv("RAY_memory_monitor_refresh_ms", "0")
    mp.setenv("RAY_worker_niceness", "0")  # Ray's default 15 starves the engines on a busy host
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        mp.undo()


@pytest.fixture(scope="session")
def plain_llm(tiny_zoo):
    llm = make_llm(tiny_zoo["target"])
    yield llm
    del llm
    gc.collect()


def metasd_config(tiny_zoo, names, policy=None, k=3):
    drafters = []
    for name in names:
        if name == "lookup":
            drafters.append({"name": name, "kind": "ngram", "prompt_lookup_min": 1,
                             "prompt_lookup_max": 3})
        else:
            drafters.append({"name": name, "kind": "draft_model", "path": tiny_zoo[name]})
    # The bandit's own choices (objective "alignment"): what these tests check;
    # the throughput objective has tests of its own.
    return {"num_speculative_tokens": k, "drafters": drafters,
            "policy": policy or {"name": "ucb", "beta": 1.0}, "objective": "alignment",
            "log_stats_interval_s": 0}


@pytest.fixture(scope="session")
def metasd4_llm(tiny_zoo):
    """Four arms: an aligned drafter, two random ones and prompt lookup."""
    cfg = metasd_config(tiny_zoo, ["bad1", "good", "bad2", "lookup"])
    llm = make_llm(tiny_zoo["target"], {"method": "metasd", "config": cfg})
    yield llm
    del llm
    gc.collect()


def stats(llm):
    return llm.collective_rpc("metasd_stats")[0]
