"""Config fuzzing: random mutations of a valid metasd.json are either accepted
or rejected with one MetaSDConfigError naming the field and the fix; nothing
else escapes (no TypeError, RecursionError, ... tracebacks at engine start).

Mutations: dropped keys, wrong types, huge / negative / non-finite numbers,
unicode and NUL characters, unknown keys, deep nesting; each mutated config
is loaded as a dict, as inline JSON and as a metasd.json file.
"""
import copy
import json
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_metasd.config import MetaSDConfig, MetaSDConfigError, load_config

VALID = {
    "num_speculative_tokens": 4,
    "drafters": [
        {"name": "code", "kind": "draft_model", "path": "zoo/drafter-code"},
        {"name": "lookup", "kind": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    ],
    "policy": {"name": "exp3", "gamma": 0.1},
    "reward": "bd",
    "seed": 0,
    "warm_start": False,
    "log_stats_interval_s": 10.0,
}

NASTY_NUMBERS = [0, -1, 1, 2, 10**30, -10**30, 2**63, 2**64 + 1, 10**400, 0.5, -0.0, 1e308,
                 5e-324, math.nan, math.inf, -math.inf]
NASTY_STRINGS = ["", " ", "4", "ucb", "exp3", "fixed", "ngram", "draft_model", "bd",
                 "acceptance", "zoo/drafter-code", "/nonexistent/drafter", "..", "\x00",
                 "a\x00b", "ü∂漢字😀", "\ud800", "x" * 5000, "{", '{"a": 1}', "$(rm -rf /)"]
KEYS = ["name", "kind", "path", "beta", "gamma", "eta", "alpha", "window", "epsilon", "arm",
        "prompt_lookup_min", "prompt_lookup_max", "ünknown", "", "x" * 300]

scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(NASTY_NUMBERS),
                    st.integers(), st.floats(), st.sampled_from(NASTY_STRINGS), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner,
                                        max_size=3), max_leaves=8)


def nest(value, depth, as_list):
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


def locations(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from locations(child, prefix + (key,))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from locations(child, prefix + (i,))


@st.composite
def mutated_configs(draw):
    cfg = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(list(locations(cfg))))
        op = draw(st.sampled_from(["drop", "replace", "add", "nest", "root"]))
        if op == "root":
            return draw(values)  # not even an object
        if not where:
            cfg[draw(st.sampled_from(KEYS) | st.text(max_size=8))] = draw(values)
            continue
        parent = cfg
        for key in where[:-1]:
            parent = parent[key]
        leaf = where[-1]
        if op == "drop":
            del parent[leaf]
        elif op == "replace":
            parent[leaf] = draw(values)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS) | st.text(max_size=8))] = draw(values)
        elif op == "nest":
            # Very deep structures have their own explicit cases below; here
            # they left objects whose repr overflows when garbage-collected.
            parent[leaf] = nest(draw(scalars), draw(st.sampled_from([1, 3, 50, 500])),
                                draw(st.booleans()))
            break  # deep structures are not walked further
    return cfg


def check(source):
    """Accepted (a MetaSDConfig) or a one-line MetaSDConfigError naming the field."""
    try:
        cfg = load_config(source)
    except MetaSDConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg, msg
        # "<field path>: <problem>[; <fix>]", one such clause per problem.
        assert re.match(r"^\S.*?: \S", msg, re.S), msg
        return None
    assert isinstance(cfg, MetaSDConfig)
    return cfg


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "zoo" / "drafter-code").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(mutated_configs())
def test_mutated_config_is_accepted_or_rejected_clearly(workdir, cfg):
    check(cfg)  # as a dict (LLM(speculative_config={"config": {...}}))
    try:
        text = json.dumps(cfg)  # NaN / Infinity become JSON's non-standard literals
    except (ValueError, RecursionError):
        return
    if text.lstrip().startswith("{"):
        check(text)  # inline JSON
    path = workdir / "metasd.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check(str(path))  # a file


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_file_contents_are_rejected_clearly(workdir, blob):
    path = workdir / "metasd.json"
    path.write_bytes(blob)
    check(str(path))


@FUZZ
@given(st.text(max_size=120))
def test_arbitrary_inline_json_text(workdir, tail):
    check("{" + tail)


@pytest.mark.parametrize("source", [
    4, 1.5, None, True, [VALID], b"{}", object(),  # not a path, JSON text or dict
    "{" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000,  # deep JSON text
    {"num_speculative_tokens": 4, "drafters": nest(1, 100_000, True)},  # deep dict
    {"num_speculative_tokens": 4, "drafters": nest(1, 100_000, False)},
    "/nonexistent/metasd.json", "a\x00b.json", "x" * 10_000,  # unreadable paths
])
def test_hostile_sources_are_rejected_clearly(workdir, source):
    assert check(source) is None


@pytest.mark.parametrize("policy", [
    {"name": "ucb", "beta": math.nan}, {"name": "ucb", "beta": math.inf},
    {"name": "ucb", "beta": 10**400}, {"name": "exp3", "gamma": math.nan},
    {"name": "exp3", "eta": math.inf}, {"name": "discounted_ucb", "gamma": math.nan},
    {"name": "epsilon_greedy", "epsilon": math.nan}, {"name": "sliding_window_ucb", "window": 1.5},
    {"name": "fixed", "arm": 10**30}, {"name": "fixed", "arm": -1},
])
def test_non_finite_or_out_of_range_policy_parameters_are_rejected(workdir, policy):
    """NaN passed every range check before (NaN < 0 is False) and made UCB
    always pick arm 0; an int beyond float range crashed at the first step."""
    cfg = dict(VALID, policy=policy)
    with pytest.raises(MetaSDConfigError, match=r"^policy\.\w+: "):
        load_config(cfg)
    with pytest.raises(MetaSDConfigError, match=r"^policy\.\w+: "):
        load_config(json.dumps(cfg))  # Python's json reads NaN / Infinity literals


def test_nul_in_drafter_path_is_a_clear_error(workdir):
    cfg = copy.deepcopy(VALID)
    cfg["drafters"][0]["path"] = "zoo/drafter\x00code"
    with pytest.raises(MetaSDConfigError, match=r"^drafters\[0\]\.path: .* does not exist"):
        load_config(cfg)
