"""Alignment rewards, batched on flattened draft tensors (torch; the per-row
sums in one compiled pass on the host).

vLLM flattens the drafts of a batch: row i owns flat positions
``cu[i-1] .. cu[i]-1`` where ``cu = cu_num_draft_tokens`` (cumulative draft
counts; a row may have 0 drafts, or fewer than k: a partial draft). Every
reward here is a float32 host tensor [B] in [0, 1]; a row with nothing drafted gets
NaN ("no reward this step"), which the state store skips.

Partial drafts are normalised by what was drafted (n_i), not by k: the paper's
1/N_max assumes full blocks, and dividing a 2-token draft by k=4 would punish
a drafter (e.g. n-gram lookup that found a short match) for drafting less,
although its alignment on what it drafted is what the reward measures.

:func:`bd_reward` is the reward the engine computes at verification
(``vllm_metasd.feedback``) and the one the hand-computed tests check.
"""
from __future__ import annotations

import numpy as np
import torch

from vllm_metasd.core.jit import njit


def segment_mean(values: torch.Tensor, cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """Per-row mean of per-position values [T] (float32, on the host); NaN for
    empty rows. One compiled pass on the host copy: a handful of small tensor
    ops would each cost more, right after the target's forward."""
    if values.is_floating_point():
        values = values.float()  # bf16 has no numpy type
    return torch.from_numpy(_row_means(values.cpu().numpy(),
                                       cu_num_draft_tokens.cpu().numpy()))


@njit(cache=True)
def _row_means(values, cu):
    out = np.empty(len(cu), dtype=np.float32)
    start = 0
    for i in range(len(cu)):
        total = 0.0
        for j in range(start, cu[i]):
            total += values[j]
        out[i] = total / (cu[i] - start) if cu[i] > start else np.nan
        start = cu[i]
    return out


def compile_kernels() -> None:
    """Compile this module's kernels with the engine's argument types now
    (numba caches them on disk), not during the first verification."""
    cu, out = np.ones(1, dtype=np.int32), np.zeros((1, 2), dtype=np.int32)
    for values in (np.zeros(1, dtype=bool), np.zeros(1, dtype=np.float32)):
        _row_means(values, cu)
    accepted_counts(out, np.ones(1, dtype=np.int64))


@njit(cache=True)
def accepted_counts(output_token_ids, num_drafted):
    """Drafted tokens accepted per row, from the rejection sampler's output
    [B, k+1] (-1 = empty): the emitted tokens minus the one bonus/recovered
    token, at most what was drafted."""
    b = output_token_ids.shape[0]
    out = np.zeros(b, dtype=np.int64)
    for i in range(b):
        emitted = 0
        for j in range(output_token_ids.shape[1]):
            emitted += output_token_ids[i, j] != -1
        out[i] = min(max(emitted - 1, 0), num_drafted[i])
    return out


def token_alignment(
    draft_token_ids: torch.Tensor,  # [T]
    draft_probs: torch.Tensor | None,  # [T, V] drafter q, or None (deterministic drafts)
    target_logits: torch.Tensor,  # [T, V] as the rejection sampler sees them
    q_top: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([T, m] probs, [T, m] ids)
) -> torch.Tensor:
    """``1 - TV(p_j, q_j) = sum_v min(p_j(v), q_j(v))`` per drafted position,
    at every temperature, from the full distributions (the paper's BD).

    p = softmax of the target logits as verification sees them (temperature,
    top-k, top-p applied; at temperature 0 vLLM leaves them raw, so p is the
    target's own distribution). q = the drafter's distribution; a
    deterministic draft (n-gram, or no q) is q = one-hot(d), for which
    ``1 - TV = p[d]``. The min form is one [T, V] temporary and exact in bf16.

    ``q_top`` (when ``draft_probs`` is None): q only at the drafter's m most
    likely tokens (greedy batches, where vLLM itself needs no q); the sum runs
    over those m tokens, a lower bound of ``1 - TV`` that is exact when q's
    mass lies there, and costs one pass over the target logits (logsumexp).

    A draft id -1 is vLLM's placeholder (a request resumed after preemption
    gets padded drafts, always rejected): it scores 0.
    """
    vocab = target_logits.shape[-1]
    valid = (draft_token_ids >= 0) & (draft_token_ids < vocab)
    if draft_probs is None and q_top is not None:
        q_vals, q_ids = q_top
        logits = target_logits.float()
        p_top = (logits.gather(1, q_ids.long()) - logits.logsumexp(dim=-1, keepdim=True)).exp()
        soft = torch.minimum(p_top, q_vals.float()).sum(dim=-1)
        return torch.where(valid, soft.clamp_(0.0, 1.0), torch.zeros_like(soft))
    p = target_logits.softmax(dim=-1, dtype=torch.float32)
    if draft_probs is None:
        safe = draft_token_ids.long().clamp(0, vocab - 1)
        soft = p.gather(1, safe.unsqueeze(1)).squeeze(1)
    else:
        soft = torch.minimum(p, draft_probs.float()).sum(dim=-1)
    return torch.where(valid, soft.clamp_(0.0, 1.0), torch.zeros_like(soft))


def bd_reward(draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None,
              target_logits: torch.Tensor, cu_num_draft_tokens: torch.Tensor,
              q_top: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Block-divergence reward per row: ``1/n_i * sum_j (1 - TV(p_j, q_j))``."""
    return segment_mean(token_alignment(draft_token_ids, draft_probs, target_logits, q_top),
                        cu_num_draft_tokens)


def match_reward(draft_token_ids: torch.Tensor, target_logits: torch.Tensor,
                 cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """Share of each row's drafted tokens that are the target's most likely
    token (argmax of the logits verification sees): no drafter probabilities
    needed. At temperature 0 it is the BD of one-hot p and q, position by
    position (a draft past the first mismatch still scores if it agrees
    there). A placeholder draft (-1) scores 0."""
    hit = draft_token_ids == target_logits.argmax(dim=-1)
    return segment_mean(hit, cu_num_draft_tokens)


def acceptance_reward(num_accepted: torch.Tensor, num_drafted: torch.Tensor) -> torch.Tensor:
    """Accepted / drafted per row (float32); NaN where nothing was drafted."""
    return num_accepted.float() / num_drafted.float()
