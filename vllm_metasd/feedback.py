"""Alignment feedback captured at verification (torch only, no vLLM import).

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

import torch

from vllm_metasd.core.rewards import acceptance_reward, segment_mean

_local = threading.local()


@dataclasses.dataclass
class Verification:
    reward_kind: str
    rewards: torch.Tensor | None = None  # [B] float, NaN where nothing was drafted
    num_drafted: torch.Tensor | None = None  # [B] int
    num_accepted: torch.Tensor | None = None  # [B] int
    seconds: float = 0.0  # spent computing the above (MetaSD's reward overhead)


@contextlib.contextmanager
def capture(reward_kind: str) -> Iterator[Verification]:
    record = Verification(reward_kind)
    _local.current = record
    try:
        yield record
    finally:
        _local.current = None


def token_alignment(
    draft_token_ids: torch.Tensor,  # [T]
    draft_probs: torch.Tensor | None,  # [T, V] or None (deterministic drafts)
    target_logits: torch.Tensor,  # [T, V], temperature/top-k/top-p applied
    is_greedy_token: torch.Tensor | None,  # [T] bool, None = all greedy
) -> torch.Tensor:
    """``1 - TV(p_j, q_j)`` per drafted position.

    Greedy rows: p and q are both one-hot (the drafter proposed its argmax),
    so the term is 1 where the draft equals the target argmax. Random rows:
    p = softmax of the processed logits; a deterministic draft (n-gram, or no
    q) is q = one-hot(d), for which ``1 - TV = p[d]``.

    A draft id -1 is vLLM's placeholder (a request resumed after preemption
    gets padded drafts, always rejected): it scores 0.
    """
    match = (target_logits.argmax(dim=-1) == draft_token_ids).float()
    if is_greedy_token is None:
        return match
    p = target_logits.softmax(dim=-1, dtype=torch.float32)
    valid = (draft_token_ids >= 0) & (draft_token_ids < p.shape[-1])
    if draft_probs is None:
        safe = draft_token_ids.long().clamp(0, p.shape[-1] - 1)
        soft = p.gather(1, safe.unsqueeze(1)).squeeze(1)
    else:
        soft = 1.0 - 0.5 * (p - draft_probs.float()).abs().sum(dim=-1)
    soft = torch.where(valid, soft.clamp_(0.0, 1.0), torch.zeros_like(soft))
    return torch.where(is_greedy_token, match, soft)


def capturing() -> bool:
    return getattr(_local, "current", None) is not None


def observe_drafts(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: list[int],
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    is_greedy_row: torch.Tensor | None,
) -> None:
    """Before rejection sampling (which may reuse ``target_logits`` in place):
    the BD reward of every row."""
    record: Verification | None = getattr(_local, "current", None)
    if record is None:
        return
    t0 = time.perf_counter()
    record.num_drafted = torch.tensor(num_draft_tokens, dtype=torch.int64)
    if record.reward_kind != "bd":
        record.seconds += time.perf_counter() - t0
        return
    is_greedy_token = None
    if is_greedy_row is not None:
        is_greedy_token = torch.repeat_interleave(
            is_greedy_row, record.num_drafted.to(is_greedy_row.device)
        )
    align = token_alignment(draft_token_ids, draft_probs, target_logits, is_greedy_token)
    record.rewards = segment_mean(align, cu_num_draft_tokens).cpu()
    record.seconds += time.perf_counter() - t0


def observe_output(output_token_ids: torch.Tensor) -> None:
    """After rejection sampling: accepted drafts per row ([B, k+1], -1 = empty)."""
    record: Verification | None = getattr(_local, "current", None)
    if record is None or record.num_drafted is None:
        return
    t0 = time.perf_counter()
    # Emitted tokens minus the one bonus/recovered token.
    accepted = ((output_token_ids != -1).sum(dim=1) - 1).clamp_(min=0).cpu()
    record.num_accepted = torch.minimum(accepted, record.num_drafted)
    if record.reward_kind == "acceptance":
        record.rewards = acceptance_reward(record.num_accepted, record.num_drafted)
    record.seconds += time.perf_counter() - t0
