"""Rewards against hand-computed values (no vLLM)."""
import math

import pytest
import torch

from vllm_metasd.core import (
    acceptance_reward, bd_reward, bd_reward_greedy, bd_reward_onehot_target, segment_mean,
)


def test_bd_reward_hand_computed():
    # Row 0 drafts 2 tokens, row 1 drafts 1 (a partial draft), vocab of 3.
    # pos0: p=(.5,.3,.2) q=(.2,.3,.5): L1=.3+0+.3=.6, TV=.3 -> 1-TV=.7
    # pos1: p=q                      : TV=0   -> 1
    # row 0 reward = (.7 + 1) / 2 = .85
    # pos2: p=(1,0,0) q=(0,1,0)      : TV=1   -> 0 ; row 1 reward = 0
    p = torch.tensor([[.5, .3, .2], [.1, .1, .8], [1., 0., 0.]])
    q = torch.tensor([[.2, .3, .5], [.1, .1, .8], [0., 1., 0.]])
    r = bd_reward(p, q, torch.tensor([2, 3]))
    assert r.tolist() == pytest.approx([0.85, 0.0])


def test_empty_rows_are_nan_and_partial_drafts_normalise_by_drafted():
    p = torch.tensor([[1., 0.], [0., 1.]])
    r = bd_reward(p, p.clone(), torch.tensor([0, 2, 2]))  # rows: 0, 2, 0 drafted
    assert math.isnan(r[0]) and r[1] == pytest.approx(1.0) and math.isnan(r[2])


def test_greedy_reward_is_fraction_of_matching_argmax_and_equals_onehot_bd():
    target_argmax = torch.tensor([3, 1, 2, 0, 0])
    draft = torch.tensor([3, 0, 2, 0, 1])
    cu = torch.tensor([3, 5])
    r = bd_reward_greedy(target_argmax, draft, cu)
    assert r.tolist() == pytest.approx([2 / 3, 1 / 2])
    onehot = lambda ids: torch.nn.functional.one_hot(ids, 4).float()
    assert torch.allclose(bd_reward(onehot(target_argmax), onehot(draft), cu), r)


def test_onehot_target_soft_draft_equals_bd():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(6, 5), -1)
    a = torch.randint(0, 5, (6,))
    cu = torch.tensor([1, 4, 6])
    p = torch.nn.functional.one_hot(a, 5).float()
    assert torch.allclose(bd_reward_onehot_target(a, q, cu), bd_reward(p, q, cu), atol=1e-6)


def test_rewards_in_unit_interval_on_random_distributions():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(50, 7) * 3, -1)
    q = torch.softmax(torch.randn(50, 7) * 3, -1)
    r = bd_reward(p, q, torch.tensor([10, 25, 50]))
    assert ((r >= 0) & (r <= 1)).all()


def test_acceptance_reward():
    r = acceptance_reward(torch.tensor([3, 0, 1]), torch.tensor([4, 0, 1]))
    assert r[0] == pytest.approx(0.75) and math.isnan(r[1]) and r[2] == 1.0


def test_segment_mean_bf16_input_accumulates_in_fp32():
    v = torch.full((300,), 0.1, dtype=torch.bfloat16)
    assert segment_mean(v, torch.tensor([300])).dtype == torch.float32
