"""metasd.json validation: every error names the field, the problem and a fix."""
import copy
import json
import os

import pytest

from vllm_metasd.config import MetaSDConfigError, from_speculative_config, load_config
from vllm_metasd.core import EXP3Policy, FixedArmPolicy, UCBPolicy

VALID = {
    "num_speculative_tokens": 4,
    "drafters": [
        {"name": "code", "kind": "draft_model", "path": "zoo/drafter-code"},
        {"name": "lookup", "kind": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    ],
    "policy": {"name": "ucb", "beta": 1.0},
    "reward": "bd",
    "seed": 0,
    "warm_start": False,
    "log_stats_interval_s": 10.0,
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """cwd with zoo/drafter-code existing, so VALID's relative path resolves."""
    (tmp_path / "zoo" / "drafter-code").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def with_(**changes):
    cfg = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *path, leaf = dotted.split("__")
        node = cfg
        for key in path:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is DELETE:
            del node[int(leaf) if leaf.isdigit() else leaf]
        else:
            node[int(leaf) if leaf.isdigit() else leaf] = value
    return cfg


DELETE = object()


def error_of(source) -> str:
    with pytest.raises(MetaSDConfigError) as e:
        load_config(source)
    msg = str(e.value)
    assert "Traceback" not in msg and "pydantic" not in msg and "\n" not in msg
    return msg


def test_valid_dict_loads_with_defaults_and_makes_the_policy(workdir):
    cfg = load_config({"num_speculative_tokens": 3,
                       "drafters": [{"name": "a", "kind": "draft_model",
                                     "path": "zoo/drafter-code"}]})
    assert cfg.policy.name == "ucb" and cfg.reward == "bd" and cfg.seed == 0
    assert cfg.drafters[0].path == str(workdir / "zoo" / "drafter-code")
    assert isinstance(cfg.make_policy(), UCBPolicy) and cfg.make_policy().num_arms == 1


def test_file_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    confdir = tmp_path / "conf"
    (confdir / "zoo" / "drafter-code").mkdir(parents=True)
    (confdir / "metasd.json").write_text(json.dumps(VALID))
    monkeypatch.chdir(tmp_path)  # not the config's directory
    for source in (str(confdir / "metasd.json"), confdir / "metasd.json"):
        cfg = load_config(source)
        assert cfg.drafters[0].path == str(confdir / "zoo" / "drafter-code")
        assert cfg.drafters[1].prompt_lookup_max == 4


def test_inline_json_and_policy_params(workdir):
    cfg = load_config(json.dumps(with_(policy={"name": "exp3", "gamma": 0.2, "alpha": 0.001},
                                       seed=3)))
    policy = cfg.make_policy()
    assert isinstance(policy, EXP3Policy)
    assert (policy.gamma, policy.alpha, policy.seed, policy.num_arms) == (0.2, 0.001, 3, 2)
    fixed = load_config(with_(policy={"name": "fixed", "arm": 1})).make_policy()
    assert isinstance(fixed, FixedArmPolicy) and fixed.arm == 1


def test_round_trip_through_json_dict(workdir):
    cfg = load_config(VALID)
    assert load_config(cfg.to_json_dict()) == cfg


@pytest.mark.parametrize("source,field,problem", [
    ("/nonexistent/metasd.json", "config", "not found"),
    ('{"num_speculative_tokens": 4,\n "drafters": [,]}', "config", "line 2, column 15"),
    ("[1, 2]", "config", "must be a JSON object"),
])
def test_unreadable_or_malformed_sources(workdir, source, field, problem):
    if source.startswith("["):
        (workdir / "list.json").write_text(source)
        source = str(workdir / "list.json")
    msg = error_of(source)
    assert msg.startswith(field) and problem in msg


def test_directory_and_malformed_file(workdir):
    assert "cannot read" in error_of(str(workdir))
    bad = workdir / "bad.json"
    bad.write_text('{\n  "num_speculative_tokens": 4,\n}')
    msg = error_of(bad)
    assert "not valid JSON" in msg and "line 3, column 1" in msg and "bad.json" in msg


@pytest.mark.parametrize("changes,field,problems", [
    ({"foo": 1}, "foo", ["unknown key", "remove it"]),
    ({"drafters__1__extra": 5}, "drafters[1].extra", ["unknown key"]),
    ({"policy__betta": 1.0}, "policy.betta", ["no parameter 'betta'", "beta"]),
    ({"drafters__0__path": DELETE}, "drafters[0].path", ["required field is missing"]),
    ({"drafters__0__path": "zoo/nope"}, "drafters[0].path", ["does not exist", "zoo/nope"]),
    ({"drafters__1__kind": "eagle"}, "drafters[1].kind", ["unknown drafter kind", "ngram"]),
    ({"drafters__1__kind": DELETE}, "drafters[1].kind", ["missing 'kind'"]),
    ({"policy__name": "thompson"}, "policy.name",
     ["unknown policy 'thompson'", "ucb, exp3, discounted_ucb, sliding_window_ucb"]),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens",
     ["greater than or equal to 1", "got 0", "e.g. 4"]),
    ({"num_speculative_tokens": "4"}, "num_speculative_tokens", ["valid integer", "'4'"]),
    ({"num_speculative_tokens": 129}, "num_speculative_tokens",
     ["less than or equal to 128", "got 129", "vLLM verifies at most 128"]),
    ({"num_speculative_tokens": 1000000}, "num_speculative_tokens", ["got 1000000", "1 to 128"]),
    ({"num_speculative_tokens": DELETE}, "num_speculative_tokens", ["required field is missing"]),
    ({"drafters": []}, "drafters", ["at least 1 item", "non-empty list"]),
    ({"drafters__1__name": "code"}, "drafters", ["duplicate drafter names ['code']", "unique"]),
    ({"drafters__1__name": "a.b"}, "drafters[1].name", ["'a.b'", "letters, digits"]),
    ({"drafters__1__prompt_lookup_min": 5}, "drafters[1].prompt_lookup_min",
     ["greater than prompt_lookup_max"]),
    ({"drafters__0__kind": "ngram", "drafters__0__path": DELETE}, "drafters",
     ["no drafter of kind 'draft_model'"]),
    ({"reward": "accept"}, "reward", ["'bd', 'match' or 'acceptance'", "got 'accept'"]),
    ({"seed": -1}, "seed", ["greater than or equal to 0"]),
    ({"warm_start": "yes"}, "warm_start", ["valid boolean", "true or false"]),
    ({"log_stats_interval_s": -1.0}, "log_stats_interval_s", ["greater than or equal to 0"]),
    ({"log_stats_interval_s": float("inf")}, "log_stats_interval_s", ["finite number", "inf"]),
    ({"log_stats_interval_s": float("nan")}, "log_stats_interval_s", ["finite number", "nan"]),
    ({"policy": {"name": "ucb", "beta": -1}}, "policy.beta", ["must be > 0", "got -1"]),
    ({"policy": {"name": "ucb", "beta": "1"}}, "policy.beta", ["must be a number"]),
    ({"policy": {"name": "exp3", "gamma": 1.5}}, "policy.gamma", ["(0, 1]", "got 1.5"]),
    ({"policy": {"name": "exp3", "eta": 0}}, "policy.eta", ["must be > 0"]),
    ({"policy": {"name": "discounted_ucb", "gamma": 0}}, "policy.gamma", ["(0, 1]"]),
    ({"policy": {"name": "sliding_window_ucb", "window": 0}}, "policy.window", [">= 1"]),
    ({"policy": {"name": "sliding_window_ucb", "window": 2.5}}, "policy.window",
     ["must be an integer"]),
    ({"policy": {"name": "epsilon_greedy", "epsilon": 1.5}}, "policy.epsilon", ["[0, 1]"]),
    ({"policy": {"name": "fixed", "arm": 2}}, "policy.arm", ["[0, 2)", "drafters list (0..1)"]),
    ({"policy": {"name": "fixed", "beta": 1.0}}, "policy.beta", ["no parameter 'beta'", "arm"]),
])
def test_each_error_names_field_and_problem(workdir, changes, field, problems):
    msg = error_of(with_(**changes))
    assert msg.startswith(f"{field}:"), msg
    for problem in problems:
        assert problem in msg, msg


def test_several_errors_reported_together(workdir):
    msg = error_of(with_(num_speculative_tokens=0, reward="x", foo=1))
    assert all(f in msg for f in ("num_speculative_tokens:", "reward:", "foo:"))


def test_speculative_config_wrapper(workdir):
    assert from_speculative_config({"method": "metasd", "config": VALID}).reward == "bd"
    with pytest.raises(MetaSDConfigError, match="speculative_config.config: missing"):
        from_speculative_config({"method": "metasd"})
    with pytest.raises(MetaSDConfigError, match=r"unknown keys \['model'\]"):
        from_speculative_config({"method": "metasd", "config": VALID, "model": "x"})


def test_error_is_a_value_error(workdir):
    assert issubclass(MetaSDConfigError, ValueError)
    with pytest.raises(ValueError):
        load_config(os.fspath(workdir / "missing.json"))


# ---- limits of the engine (check_engine_limits, run before the engine starts) ----------


def test_k_bound_is_vllms_max_spec_len(workdir):
    """vLLM's rejection sampler asserts max_spec_len <= MAX_SPEC_LEN at the first
    speculative step (k = 129 killed the engine there); k = 128 serves."""
    from vllm.v1.sample.rejection_sampler import MAX_SPEC_LEN

    from vllm_metasd.config import MAX_SPEC_LEN as OURS

    assert OURS == MAX_SPEC_LEN
    assert load_config(with_(num_speculative_tokens=MAX_SPEC_LEN)).num_speculative_tokens == 128


def engine_error(cfg, max_model_len):
    from vllm_metasd.config import check_engine_limits

    with pytest.raises(MetaSDConfigError) as e:
        check_engine_limits(load_config(cfg), max_model_len)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def drafter_config(workdir, **keys):
    (workdir / "zoo" / "drafter-code" / "config.json").write_text(json.dumps(keys))


def test_values_that_fit_the_engine_pass(workdir):
    from vllm_metasd.config import check_engine_limits

    drafter_config(workdir, max_position_embeddings=1024, vocab_size=4)
    check_engine_limits(load_config(VALID), 1024)
    check_engine_limits(load_config(with_(num_speculative_tokens=128)), 129)
    (workdir / "zoo" / "drafter-code" / "config.json").unlink()
    check_engine_limits(load_config(VALID), 4096)  # no config.json: vLLM's checks apply


def test_k_must_fit_max_model_len(workdir):
    msg = engine_error(with_(num_speculative_tokens=64), 64)
    assert msg.startswith("num_speculative_tokens: 64 does not fit max_model_len 64")
    assert "lower it to at most 63 or raise max_model_len" in msg


def test_prompt_lookup_max_must_fit_max_model_len(workdir):
    msg = engine_error(with_(drafters__1__prompt_lookup_max=10**9), 512)
    assert msg.startswith("drafters[1].prompt_lookup_max: 1000000000 exceeds max_model_len 512")
    assert "lower it to at most 512" in msg


@pytest.mark.parametrize("keys,named", [
    ({"max_position_embeddings": 256}, "256 positions (max_position_embeddings in"),
    ({"text_config": {"n_positions": 256, "max_position_embeddings": 4096}},
     "256 positions (n_positions in"),
])
def test_a_drafter_shorter_than_max_model_len_is_refused(workdir, keys, named):
    drafter_config(workdir, **keys)
    msg = engine_error(VALID, 512)
    assert msg.startswith("drafters[0].path: drafter 'code' handles ") and named in msg, msg
    assert "fewer than the engine's max_model_len 512" in msg
    assert "lower max_model_len to 256 or use a drafter with a context of at least 512" in msg


def test_a_rope_scaled_drafter_is_left_to_vllm(workdir):
    from vllm_metasd.config import check_engine_limits

    drafter_config(workdir, max_position_embeddings=256,
                   rope_scaling={"rope_type": "linear", "factor": 4.0})
    check_engine_limits(load_config(VALID), 1024)


def test_engine_limit_problems_are_reported_together(workdir):
    drafter_config(workdir, max_position_embeddings=8)
    msg = engine_error(with_(num_speculative_tokens=16, drafters__1__prompt_lookup_max=32), 16)
    assert all(f in msg for f in ("num_speculative_tokens:", "drafters[1].prompt_lookup_max:",
                                  "drafters[0].path:")), msg


def test_the_engine_refuses_them_before_it_starts(tiny_zoo):
    """Through vLLM's own config path (no engine is started)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_metasd.patches import apply_all

    apply_all()
    cfg = {"num_speculative_tokens": 64, "log_stats_interval_s": 0,
           "drafters": [{"name": "good", "kind": "draft_model", "path": tiny_zoo["good"]}]}
    args = EngineArgs(model=tiny_zoo["target"], enforce_eager=True, max_model_len=64,
                      speculative_config={"method": "metasd", "config": cfg})
    with pytest.raises(MetaSDConfigError, match=r"^num_speculative_tokens: 64 does not fit "
                                                r"max_model_len 64"):
        args.create_engine_config()
