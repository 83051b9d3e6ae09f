"""The engine's rewards (core.rewards) against hand-computed values (no vLLM)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_metasd.core import acceptance_reward, bd_reward, match_reward, segment_mean


def logits_of(p):
    """Target logits whose softmax is p (zeros -> -inf)."""
    return torch.as_tensor(p, dtype=torch.float32).log()


def test_bd_reward_hand_computed_3_token_vocab():
    # Row 0 drafts 2 tokens, row 1 drafts 1 (a partial draft), vocab of 3.
    # pos0: p=(.5,.3,.2) q=(.2,.3,.5): L1 = .3+0+.3 = .6, TV = .3 -> 1-TV = .7
    # pos1: p=(.1,.6,.3) q=(.3,.6,.1): L1 = .2+0+.2 = .4, TV = .2 -> 1-TV = .8
    # row 0 reward = (.7 + .8) / 2 = .75
    # pos2: p=(1,0,0)    q=(.4,.6,0) : L1 = .6+.6 = 1.2, TV = .6 -> 1-TV = .4
    # row 1 reward = .4 / 1 (normalised by the 1 token drafted, not by k)
    p = [[.5, .3, .2], [.1, .6, .3], [1., 0., 0.]]
    q = torch.tensor([[.2, .3, .5], [.3, .6, .1], [.4, .6, 0.]])
    r = bd_reward(torch.tensor([2, 1, 1]), q, logits_of(p), torch.tensor([2, 3]))
    assert r.dtype == torch.float32
    assert r.tolist() == pytest.approx([0.75, 0.4])


def test_temperature_zero_uses_the_full_distributions_not_a_token_match():
    # A greedy row: the drafter proposed its argmax (token 0) and the target's
    # argmax is token 0 too. A 0/1 match would give 1; BD from the softmax of
    # the target logits p=(.6,.4) and the drafter's q=(.9,.1) gives
    # 1 - TV = min(.6,.9) + min(.4,.1) = .7.
    r = bd_reward(torch.tensor([0]), torch.tensor([[.9, .1]]), logits_of([[.6, .4]]),
                  torch.tensor([1]))
    assert r.item() == pytest.approx(0.7)
    # The same drafter, less sure of a wrong token: p=(.6,.4), q=(.2,.8) -> .6.
    r = bd_reward(torch.tensor([1]), torch.tensor([[.2, .8]]), logits_of([[.6, .4]]),
                  torch.tensor([1]))
    assert r.item() == pytest.approx(0.6)


def test_deterministic_draft_scores_the_target_probability_of_its_token():
    # n-gram drafts (no q): q = one-hot(d), so 1 - TV = p[d].
    p = [[.7, .2, .1], [.1, .1, .8]]
    r = bd_reward(torch.tensor([0, 0]), None, logits_of(p), torch.tensor([2]))
    assert r.item() == pytest.approx((0.7 + 0.1) / 2)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 0]), 3).float()
    assert bd_reward(torch.tensor([0, 0]), onehot, logits_of(p),
                     torch.tensor([2])).item() == pytest.approx(r.item())


def test_match_reward_hand_computed():
    # Row 0 drafts 3 tokens: target argmaxes (0, 1, 2), drafts (0, 2, 2): 2 of 3
    # agree (the third after a mismatch still counts); row 1 drafts nothing
    # (NaN: no reward); row 2 drafts the placeholder -1 and a match: 1 of 2.
    p = [[.5, .3, .2], [.1, .6, .3], [.2, .2, .6], [.1, .8, .1], [.7, .2, .1]]
    r = match_reward(torch.tensor([0, 2, 2, -1, 0]), logits_of(p), torch.tensor([3, 3, 5]))
    assert r[0].item() == pytest.approx(2 / 3)
    assert math.isnan(r[1].item())
    assert r[2].item() == pytest.approx(0.5)


def test_placeholder_drafts_score_zero():
    # vLLM pads the drafts of a request resumed after preemption with -1.
    r = bd_reward(torch.tensor([-1, 0]), None, logits_of([[.5, .5], [1., 0.]]),
                  torch.tensor([2]))
    assert r.item() == pytest.approx(0.5)


def test_identical_and_disjoint_distributions_are_the_extremes():
    p = torch.tensor([[.5, .5, 0., 0.], [.25, .25, .25, .25]])
    assert bd_reward(torch.tensor([0, 1]), p.clone(), logits_of(p),
                     torch.tensor([2])).item() == pytest.approx(1.0)
    q = torch.tensor([[0., 0., .5, .5]])
    assert bd_reward(torch.tensor([2]), q, logits_of(p[:1]),
                     torch.tensor([1])).item() == pytest.approx(0.0)


def test_empty_rows_are_nan_and_partial_drafts_normalise_by_drafted():
    p = [[1., 0.], [0., 1.], [1., 0.]]
    q = torch.tensor([[1., 0.], [1., 0.], [1., 0.]])  # 1-TV: 1, 0, 1
    r = bd_reward(torch.tensor([0, 0, 0]), q, logits_of(p),
                  torch.tensor([0, 2, 2, 3, 3]))  # drafted: 0, 2, 0, 1, 0
    assert math.isnan(r[0]) and math.isnan(r[2]) and math.isnan(r[4])
    assert r[1].item() == pytest.approx(0.5) and r[3].item() == pytest.approx(1.0)


def test_segment_mean_per_row_of_flat_positions():
    r = segment_mean(torch.arange(6.0), torch.tensor([2, 2, 5, 6], dtype=torch.int32))
    assert r[[0, 2, 3]].tolist() == [0.5, 3.0, 5.0] and r[1].isnan()  # row 1: nothing drafted


def test_bf16_inputs_accumulate_in_fp32():
    # 300 positions of overlap 0.1 in one row: a bf16 accumulator rounds every
    # +0.1 to +0.125 above 16 and ends at 32, a mean of 0.107; fp32 gives 0.1.
    logits = torch.tensor([[0.0, -60.0]], dtype=torch.bfloat16).expand(300, 2)
    q = torch.zeros(300, 2, dtype=torch.bfloat16)
    q[:, 0], q[:, 1] = 0.1, 0.9
    r = bd_reward(torch.zeros(300, dtype=torch.long), q, logits, torch.tensor([300]))
    assert r.dtype == torch.float32
    assert r.item() == pytest.approx(float(torch.tensor(0.1, dtype=torch.bfloat16)), rel=1e-4)
    v = torch.full((300,), 0.1, dtype=torch.bfloat16)
    assert segment_mean(v, torch.tensor([300])).item() == pytest.approx(0.1, rel=1e-2)


def test_acceptance_reward():
    r = acceptance_reward(torch.tensor([3, 0, 1]), torch.tensor([4, 0, 1]))
    assert r[0].item() == pytest.approx(0.75) and math.isnan(r[1]) and r[2].item() == 1.0


@st.composite
def batches(draw):
    """Random distributions p, q and a random split into rows (some empty)."""
    counts = draw(st.lists(st.integers(0, 4), min_size=1, max_size=6))
    vocab = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    sharp = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    logits = torch.randn(t, vocab, generator=g) * sharp
    q = torch.softmax(torch.randn(t, vocab, generator=g) * sharp, -1)
    drafts = torch.randint(0, vocab, (t,), generator=g)
    return logits, q, drafts, torch.tensor(counts).cumsum(0), counts


@settings(max_examples=200, deadline=None)
@given(batches())
def test_rewards_in_unit_interval_nan_only_for_empty_rows(batch):
    logits, q, drafts, cu, counts = batch
    empty = torch.tensor([c == 0 for c in counts])
    for r in (bd_reward(drafts, q, logits, cu), bd_reward(drafts, None, logits, cu)):
        assert torch.equal(torch.isnan(r), empty)
        ok = r[~empty]
        assert ((ok >= 0) & (ok <= 1)).all()
    # The BD reward is 1 - TV by its textbook definition too.
    p = logits.softmax(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    ref = torch.stack([(1 - tv[cu[i] - c:cu[i]]).mean() if c else torch.tensor(math.nan)
                       for i, c in enumerate(counts)])
    assert torch.allclose(bd_reward(drafts, q, logits, cu), ref, atol=1e-5, equal_nan=True)


def test_greedy_batches_read_q_at_the_drafters_top_tokens():
    # p = (.5, .3, .2); the drafter's q = (.6, .3, .1), known at its top 2
    # tokens only: sum of min over them = .5 + .3 = .8, a lower bound of the
    # full 1 - TV = .5 + .3 + .1 = .9 (exact when q's mass is in its top m).
    logits = logits_of([[.5, .3, .2]])
    q_top = (torch.tensor([[.6, .3]]), torch.tensor([[0, 1]]))
    r = bd_reward(torch.tensor([0]), None, logits, torch.tensor([1]), q_top)
    assert r.item() == pytest.approx(0.8)
    full = bd_reward(torch.tensor([0]), torch.tensor([[.6, .3, .1]]), logits, torch.tensor([1]))
    assert full.item() == pytest.approx(0.9)
    q_all = (torch.tensor([[.6, .3, .1]]), torch.tensor([[0, 1, 2]]))
    assert bd_reward(torch.tensor([0]), None, logits, torch.tensor([1]),
                     q_all).item() == pytest.approx(0.9)
