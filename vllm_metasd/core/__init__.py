"""The MetaSD core: rewards, bandit policies, per-request state, grouping.

Pure torch/numpy/Python; no vLLM import, so it is testable in milliseconds.
"""
from vllm_metasd.core.grouping import CatchUpTracker, group_rows_by_arm, plan_catch_up
from vllm_metasd.core.policies import (
    POLICIES, ArmPrior, BanditState, DiscountedUCBPolicy, EpsilonGreedyPolicy,
    EXP3Policy, FixedArmPolicy, GlobalPrior, Policy, SlidingWindowUCBPolicy,
    ParamError, UCBPolicy, make_policy, policy_params,
)
from vllm_metasd.core.rewards import (
    acceptance_reward, bd_reward, bd_reward_greedy, bd_reward_onehot_target,
    row_ids, segment_mean,
)
from vllm_metasd.core.state import DrafterStats, RequestState, RequestStateStore

__all__ = [
    "POLICIES", "ArmPrior", "BanditState", "CatchUpTracker", "DiscountedUCBPolicy",
    "DrafterStats", "EXP3Policy", "EpsilonGreedyPolicy", "FixedArmPolicy",
    "GlobalPrior", "ParamError", "Policy", "RequestState", "RequestStateStore",
    "SlidingWindowUCBPolicy", "UCBPolicy", "acceptance_reward", "bd_reward",
    "bd_reward_greedy", "bd_reward_onehot_target", "group_rows_by_arm",
    "make_policy", "plan_catch_up", "policy_params", "row_ids", "segment_mean",
]
