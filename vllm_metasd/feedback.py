"""Alignment feedback captured at verification (no vLLM import).

The rejection-sampler patch calls :func:`observe_drafts` and
:func:`observe_output` with exactly what vLLM's ``rejection_sample`` sees. When a MetaSD model runner has opened a
:func:`capture` around its sampling step, the per-row reward and accepted
counts are computed there, batched, and handed back to the runner, which
routes them to each request's bandit before the next arm choice. Outside a
capture (any non-MetaSD engine) this module does nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Iterator

import numpy as np
import torch

from vllm_metasd.core.rewards import (
    acceptance_reward, accepted_counts, bd_reward, match_reward,
)

_local = threading.local()


@dataclasses.dataclass
class Verification:
    reward_kind: str
    rewards: torch.Tensor | None = None  # [B] float, NaN where nothing was drafted
    num_drafted: torch.Tensor | None = None  # [B] int
    num_accepted: torch.Tensor | None = None  # [B] int
    seconds: float = 0.0  # spent computing the above (MetaSD's reward overhead)
    q_top: tuple | None = None  # drafters' top-m q per draft token, when vLLM has no q


@contextlib.contextmanager
def capture(reward_kind: str) -> Iterator[Verification]:
    record = Verification(reward_kind)
    _local.current = record
    try:
        yield record
    finally:
        _local.current = None


def capturing() -> bool:
    return getattr(_local, "current", None) is not None


def observe_drafts(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: list[int],
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
) -> None:
    """Before rejection sampling (which may reuse ``target_logits`` in place):
    the BD reward of every row, from the full distributions, or the match reward."""
    record: Verification | None = getattr(_local, "current", None)
    if record is None:
        return
    t0 = time.perf_counter()
    record.num_drafted = torch.from_numpy(np.array(num_draft_tokens, dtype=np.int64))
    if record.reward_kind == "bd":
        record.rewards = bd_reward(draft_token_ids, draft_probs, target_logits,
                                   cu_num_draft_tokens, record.q_top)
    elif record.reward_kind == "match":
        record.rewards = match_reward(draft_token_ids, target_logits, cu_num_draft_tokens)
    record.seconds += time.perf_counter() - t0


def observe_output(output_token_ids: torch.Tensor) -> None:
    """After rejection sampling: accepted drafts per row ([B, k+1], -1 = empty)."""
    record: Verification | None = getattr(_local, "current", None)
    if record is None or record.num_drafted is None:
        return
    t0 = time.perf_counter()
    record.num_accepted = torch.from_numpy(accepted_counts(output_token_ids.cpu().numpy(),
                                                           record.num_drafted.numpy()))
    if record.reward_kind == "acceptance":
        record.rewards = acceptance_reward(record.num_accepted, record.num_drafted)
    elif record.reward_kind == "none":  # nothing to learn (policy "fixed"): counts only
        record.rewards = torch.full(record.num_drafted.shape, float("nan"))
    record.seconds += time.perf_counter() - t0
