"""Drafter fault containment: validate what a drafter returns; inject faults in tests.

A drafter's output reaches vLLM's scheduler and rejection sampler, so garbage
there (token ids outside the vocabulary, wrong shapes, NaN or negative
probabilities) would crash the target forward or silently bias sampling.
``checked_draft`` turns a drafter's raw output into plain drafts or raises
``DraftError``; the proposer treats that like an exception from the drafter:
that arm's rows get no speculation this step and the arm is penalised
(disabled after repeated failures). Torch/numpy only, no vLLM import.

Fault injection is for tests only: ``METASD_FAULT_INJECT="<arm>:raise|garbage[,...]"``
(read once when the proposer starts, in the worker process) makes the named
drafters raise, or return a corrupted draft (a different corruption each
call), every time they are asked to draft. Unset in production.
"""
from __future__ import annotations

import math

import numpy as np
import torch

FAULT_ENV = "METASD_FAULT_INJECT"
FAULT_MODES = ("raise", "garbage")
PROB_SUM_TOL = 1e-3  # float32 softmax over any vocabulary sums to 1 far closer


class DraftError(ValueError):
    """A drafter returned something that is not a valid draft."""


def checked_draft(ids, q: torch.Tensor | None, n: int, k: int, vocab: int,
                  need_q: bool = False) -> list[list[int]]:
    """A drafter's output as ``n`` drafts of at most ``k`` token ids in
    ``[0, vocab)``, else DraftError.

    ``ids``: an integer tensor [n, <=k] (draft LMs) or n sequences (n-gram).
    ``q``: the drafter's probabilities [n, width, vocab] when sampling
    (``need_q``: they are required); they must be finite, non-negative, sum to
    1 and give each drafted token a positive probability (the rejection
    sampler divides by it).
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] > k or ids.is_floating_point():
            raise DraftError(f"draft ids of shape {tuple(ids.shape)} and dtype {ids.dtype}; "
                             f"expected integers of shape [{n}, <={k}]")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise DraftError(f"draft ids in [{int(ids.min())}, {int(ids.max())}], "
                             f"outside the vocabulary [0, {vocab})")
        drafts = ids.tolist()
    else:
        if q is not None:
            raise DraftError("draft probabilities without a draft id tensor")
        if len(ids) != n:
            raise DraftError(f"{len(ids)} drafts for {n} requests")
        drafts = []
        for d in ids:
            a = np.asarray(d)
            if a.ndim != 1 or a.size > k or (a.size and a.dtype.kind not in "iu"):
                raise DraftError(f"draft {d!r:.80}: expected at most {k} integer token ids")
            if a.size and (a.min() < 0 or a.max() >= vocab):
                raise DraftError(f"draft ids in [{a.min()}, {a.max()}], outside the "
                                 f"vocabulary [0, {vocab})")
            drafts.append(a.tolist())
    if q is None:
        if need_q:
            raise DraftError("no draft probabilities for a batch that samples")
        return drafts
    if tuple(q.shape) != (n, ids.shape[1], vocab):
        raise DraftError(f"draft probabilities of shape {tuple(q.shape)}; expected "
                         f"{(n, ids.shape[1], vocab)}")
    qf = q.float()
    if not bool(torch.isfinite(qf).all()) or bool((qf < 0).any()):
        raise DraftError("draft probabilities are not all finite and non-negative")
    if bool(((qf.sum(-1) - 1.0).abs() > PROB_SUM_TOL).any()):
        raise DraftError("draft probabilities do not sum to 1")
    if ids.numel() and bool((qf.gather(-1, ids.long().unsqueeze(-1)) <= 0).any()):
        raise DraftError("a drafted token has probability 0 under its drafter")
    return drafts


# ---- test-only fault injection -------------------------------------------------

def parse_fault_injection(spec: str, arm_names: list[str]) -> dict[int, str]:
    """``"bad1:raise,good:garbage"`` -> {arm index: mode}; "" -> {}."""
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, mode = item.partition(":")
        if name not in arm_names or mode not in FAULT_MODES:
            raise ValueError(f"{FAULT_ENV}={spec!r}: {item!r} is not <drafter>:<mode> with "
                             f"drafter in {arm_names} and mode in {list(FAULT_MODES)}")
        faults[arm_names.index(name)] = mode
    return faults


# Cycled per arm; probability corruptions first, so a sampled batch meets them
# before the arm is disabled.
GARBAGE_KINDS = ("nan_probs", "id_too_large", "negative_probs", "too_long", "id_negative")


def corrupt_draft(ids, q: torch.Tensor | None, vocab: int, kind: str):
    """A corrupted copy of a real draft (ids, q). Probability corruptions need
    q; without it (greedy batches, n-gram arms) the ids become floats."""
    as_tensor = isinstance(ids, torch.Tensor)
    if kind in ("id_too_large", "id_negative"):
        bad = vocab + 7 if kind == "id_too_large" else -1
        if as_tensor:
            ids = ids.clone()
            ids.view(-1)[:1] = bad
            return ids, q
        return [[bad]] + list(ids[1:]), q
    if kind == "too_long":
        if as_tensor:
            return torch.cat([ids, ids[:, :1]], dim=1), q
        return list(ids) + [[0]], q  # one draft more than requests
    if q is None:
        return (ids.float() if as_tensor else [[0.5] for _ in ids]), q
    q = q.clone()
    q.view(-1)[:1] = math.nan if kind == "nan_probs" else -0.5
    return ids, q
