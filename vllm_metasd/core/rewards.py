"""Alignment rewards, batched on flattened draft tensors (torch only).

vLLM flattens the drafts of a batch: row i owns flat positions
``cu[i-1] .. cu[i]-1`` where ``cu = cu_num_draft_tokens`` (cumulative draft
counts, rows may have 0 drafts or fewer than k: partial drafts). Every reward
here is a per-row tensor; a row with nothing drafted gets NaN ("no reward this
step"), which the state store skips.

Partial drafts are normalised by what was drafted (n_i), not by k: a drafter
that proposed 2 tokens both matching is perfectly aligned on what it did.
"""
from __future__ import annotations

import torch


def row_ids(cu_num_draft_tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row index of every flat draft position."""
    counts = torch.diff(cu_num_draft_tokens.long(), prepend=cu_num_draft_tokens.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts,
                                   output_size=num_tokens)


def segment_mean(values: torch.Tensor, cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """Per-row mean of per-position values [T] (float32); NaN for empty rows."""
    cu = cu_num_draft_tokens.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1)).float()
    sums = torch.zeros(len(cu), dtype=torch.float32, device=values.device)
    sums.index_add_(0, row_ids(cu, values.shape[0]), values.float())
    return sums / counts  # 0/0 = NaN marks rows with nothing drafted


def bd_reward(target_probs: torch.Tensor, draft_probs: torch.Tensor,
              cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """Block divergence reward ``1/n_i * sum_j (1 - TV(p_j, q_j))`` per row."""
    tv = 0.5 * (target_probs.float() - draft_probs.float()).abs().sum(dim=-1)
    return segment_mean((1.0 - tv).clamp_(0.0, 1.0), cu_num_draft_tokens)


def bd_reward_greedy(target_argmax: torch.Tensor, draft_token_ids: torch.Tensor,
                     cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """One-hot p and q (temperature 0): fraction of drafts equal to the target argmax."""
    return segment_mean((target_argmax == draft_token_ids).float(), cu_num_draft_tokens)


def bd_reward_onehot_target(target_argmax: torch.Tensor, draft_probs: torch.Tensor,
                            cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """One-hot p, soft q: ``1 - TV(onehot(a), q) = q[a]``."""
    q_at = draft_probs.float().gather(1, target_argmax.long().unsqueeze(1)).squeeze(1)
    return segment_mean(q_at, cu_num_draft_tokens)


def acceptance_reward(num_accepted: torch.Tensor, num_drafted: torch.Tensor) -> torch.Tensor:
    """Accepted / drafted per row; NaN where nothing was drafted."""
    return num_accepted.float() / num_drafted.float()
