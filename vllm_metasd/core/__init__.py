"""The MetaSD core: rewards, bandit policies, per-request ledgers, the step
controller, grouping. Pure torch/numpy/Python; no vLLM import, so it is
testable in milliseconds.
"""
from vllm_metasd.core.controller import MAX_ARM_FAILURES, StepController
from vllm_metasd.core.draft import Draft, DraftStep
from vllm_metasd.core.grouping import group_rows_by_arm, plan_catch_up
from vllm_metasd.core.policies import (
    POLICIES, ArmPrior, BanditState, DiscountedUCBPolicy, EpsilonGreedyPolicy,
    EXP3Policy, FixedArmPolicy, Policy, SlidingWindowUCBPolicy,
    ParamError, UCBPolicy, make_policy, policy_params,
)
from vllm_metasd.core.rewards import (
    acceptance_reward, bd_reward, match_reward, segment_mean, token_alignment,
)
from vllm_metasd.core.state import DrafterStats, RequestState, RequestStateStore

__all__ = [
    "MAX_ARM_FAILURES", "POLICIES", "ArmPrior", "BanditState", "DiscountedUCBPolicy",
    "Draft", "DraftStep", "DrafterStats", "EXP3Policy", "EpsilonGreedyPolicy",
    "FixedArmPolicy", "ParamError", "Policy", "RequestState",
    "RequestStateStore", "SlidingWindowUCBPolicy", "StepController", "UCBPolicy",
    "acceptance_reward", "bd_reward", "match_reward", "group_rows_by_arm", "make_policy",
    "plan_catch_up", "policy_params", "segment_mean", "token_alignment",
]
