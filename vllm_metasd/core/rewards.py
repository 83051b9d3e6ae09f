"""Alignment rewards, batched on flattened draft tensors (torch only).

vLLM flattens the drafts of a batch: row i owns flat positions
``cu[i-1] .. cu[i]-1`` where ``cu = cu_num_draft_tokens`` (cumulative draft
counts; a row may have 0 drafts, or fewer than k: a partial draft). Every
reward here is a float32 tensor [B] in [0, 1]; a row with nothing drafted gets
NaN ("no reward this step"), which the state store skips.

Partial drafts are normalised by what was drafted (n_i), not by k: the paper's
1/N_max assumes full blocks, and dividing a 2-token draft by k=4 would punish
a drafter (e.g. n-gram lookup that found a short match) for drafting less,
although its alignment on what it drafted is what the reward measures.
"""
from __future__ import annotations

import torch


def row_ids(cu_num_draft_tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row index of every flat draft position, [num_tokens]."""
    cu = cu_num_draft_tokens.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    rows = torch.arange(len(counts), device=counts.device)
    return torch.repeat_interleave(rows, counts, output_size=num_tokens)


def segment_mean(values: torch.Tensor, cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """Per-row mean of per-position values [T], accumulated in float32; NaN for empty rows."""
    cu = cu_num_draft_tokens.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1)).float()
    sums = torch.zeros(len(cu), dtype=torch.float32, device=values.device)
    sums.index_add_(0, row_ids(cu, values.shape[0]).to(values.device), values.float())
    return sums / counts  # 0 / 0 = NaN marks rows with nothing drafted


def bd_reward(target_probs: torch.Tensor, draft_probs: torch.Tensor,
              cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """Block-divergence reward per row: ``1/n_i * sum_j (1 - TV(p_j, q_j))``.

    For distributions, ``1 - TV(p, q) = 1 - 0.5 * sum|p - q| = sum min(p, q)``.
    The min form is used: one [T, V] temporary instead of three, and exact in
    bf16 (min picks a value, a difference would round).
    """
    overlap = torch.minimum(target_probs, draft_probs).sum(dim=-1, dtype=torch.float32)
    return segment_mean(overlap.clamp_(0.0, 1.0), cu_num_draft_tokens)


def bd_reward_greedy(target_argmax: torch.Tensor, draft_token_ids: torch.Tensor,
                     cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """One-hot p and q (greedy target, deterministic drafter): 1 - TV is 1 when
    the tokens agree, else 0, so the reward is the fraction of matching positions."""
    return segment_mean((target_argmax == draft_token_ids).float(), cu_num_draft_tokens)


def bd_reward_onehot_target(target_argmax: torch.Tensor, draft_probs: torch.Tensor,
                            cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """Greedy target (p = onehot(a)) against a soft draft q: ``1 - TV = q[a]``."""
    q_at = draft_probs.gather(1, target_argmax.long().unsqueeze(1)).squeeze(1)
    return segment_mean(q_at.float().clamp_(0.0, 1.0), cu_num_draft_tokens)


def acceptance_reward(num_accepted: torch.Tensor, num_drafted: torch.Tensor) -> torch.Tensor:
    """Accepted / drafted per row (float32); NaN where nothing was drafted."""
    return num_accepted.float() / num_drafted.float()
