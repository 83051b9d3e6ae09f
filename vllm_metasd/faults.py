"""Drafter fault containment: validate what an arm returns; inject faults in tests.

A drafter's output reaches vLLM's scheduler and rejection sampler, so garbage
there (token ids outside the vocabulary, wrong shapes, NaN or negative
probabilities) would crash the target forward or silently bias sampling.
``check_draft`` turns an arm's ``Draft`` into plain ids + lengths or raises
``DraftError``; the step controller treats that like an exception from the
drafter (no speculation for its rows this step, reward 0, disabled after
repeated failures). One pass over q and one host transfer per draft.

Fault injection is for tests only: ``METASD_FAULT_INJECT="<arm>:raise|garbage[,...]"``
(read once when the proposer starts, in the worker process) wraps the named
arms in ``FaultyArm``, which raises, or returns a corrupted draft (a different
corruption each call), every time it is asked to draft. Unset in production:
the production path has no fault branches.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from vllm_metasd.core.draft import Draft

FAULT_ENV = "METASD_FAULT_INJECT"
FAULT_MODES = ("raise", "garbage")
PROB_SUM_TOL = 1e-3  # float32 softmax over any vocabulary sums to 1 far closer


class DraftError(ValueError):
    """A drafter returned something that is not a valid draft."""


def check_draft(draft: Draft, n: int, k: int, vocab: int,
                need_q: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``draft`` as (ids [n, w] int64 on the CPU, valid length per row), else DraftError.

    Ids: ``n`` rows of at most ``k`` ids in ``[0, vocab)`` (within each row's
    length). q (required when ``need_q``): [n, w, vocab], finite,
    non-negative, summing to 1, positive at each drafted token (the rejection
    sampler divides by it).
    """
    ids, q = draft.ids, draft.q
    if (ids.ndim != 2 or ids.shape[0] != n or ids.shape[1] > k
            or (ids.is_floating_point() if isinstance(ids, torch.Tensor)
                else ids.dtype.kind not in "iu")):
        raise DraftError(f"draft ids of shape {tuple(ids.shape)} and dtype {ids.dtype}; "
                         f"expected integers of shape [{n}, <={k}]")
    width = ids.shape[1]
    if q is None and need_q:
        raise DraftError("no draft probabilities for a batch that samples")
    if q is not None and tuple(q.shape) != (n, width, vocab):
        raise DraftError(f"draft probabilities of shape {tuple(q.shape)}; expected "
                         f"{(n, width, vocab)}")
    flags = ()
    if isinstance(ids, torch.Tensor):
        if q is not None:
            qf = q.float()
            at = qf.gather(-1, ids.long().clamp(0, vocab - 1).unsqueeze(-1))
            flags = torch.stack([((qf.sum(-1) - 1.0).abs() <= PROB_SUM_TOL).all(),
                                 (qf.amin(-1) >= 0).all(), (at > 0).all()]).long()
            host = torch.cat([ids.reshape(-1).long(), flags]).cpu().numpy()  # one transfer
            ids, flags = host[:n * width].reshape(n, width), host[n * width:]
        else:
            ids = ids.long().cpu().numpy()
    lengths = (np.full(n, width, dtype=np.int64) if draft.lengths is None
               else np.asarray(draft.lengths, dtype=np.int64))
    if lengths.shape != (n,) or lengths.min(initial=0) < 0 or lengths.max(initial=0) > width:
        raise DraftError(f"draft lengths {lengths!r:.80} do not fit drafts of width {width}")
    used = ids if draft.lengths is None else ids[np.arange(width) < lengths[:, None]]
    if used.size and (used.min() < 0 or used.max() >= vocab):
        raise DraftError(f"draft ids in [{used.min()}, {used.max()}], outside the "
                         f"vocabulary [0, {vocab})")
    if len(flags) and not flags[0]:
        raise DraftError("draft probabilities do not sum to 1 (or are not finite)")
    if len(flags) and not flags[1]:
        raise DraftError("draft probabilities are not all non-negative")
    if len(flags) and not flags[2]:
        raise DraftError("a drafted token has probability 0 under its drafter")
    return ids, lengths


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


def corrupt_draft(draft: Draft, vocab: int, kind: str) -> Draft:
    """A corrupted copy of a real draft. Probability corruptions need q;
    without it (greedy batches, n-gram arms) the ids become floats."""
    ids, q = draft.ids, draft.q
    lib = torch if isinstance(ids, torch.Tensor) else np
    if kind in ("id_too_large", "id_negative"):
        ids = ids.clone() if lib is torch else ids.copy()
        ids.reshape(-1)[:1] = vocab + 7 if kind == "id_too_large" else -1
        lengths = None if draft.lengths is None else np.maximum(draft.lengths, 1)
        if ids.shape[1] == 0:
            return dataclasses.replace(draft, ids=ids.astype(float) if lib is np else ids.float())
        return dataclasses.replace(draft, ids=ids, lengths=lengths)
    if kind == "too_long":
        more = lib.cat([ids, ids[:, :1]], 1) if lib is torch else np.concatenate(
            [ids, np.zeros((ids.shape[0], 1), ids.dtype)], 1)
        lengths = None if draft.lengths is None else draft.lengths + 1
        return dataclasses.replace(draft, ids=more, lengths=lengths)
    if q is None:
        return dataclasses.replace(draft, ids=ids.float() if lib is torch else ids + 0.5)
    q = q.clone()
    q.view(-1)[:1] = math.nan if kind == "nan_probs" else -0.5
    return dataclasses.replace(draft, q=q)


class FaultyArm:
    """Test-only wrapper: the arm raises, or returns garbage, on every call."""

    def __init__(self, arm, name: str, mode: str, vocab: int):
        self.arm, self.name, self.mode, self.vocab = arm, name, mode, vocab
        self.calls = 0

    def __getattr__(self, attr):
        return getattr(self.arm, attr)

    def draft(self, step) -> Draft:
        if self.mode == "raise":
            raise RuntimeError(f"{FAULT_ENV}: injected fault in {self.name!r}")
        kind = GARBAGE_KINDS[self.calls % len(GARBAGE_KINDS)]
        self.calls += 1
        return corrupt_draft(self.arm.draft(step), self.vocab, kind)
