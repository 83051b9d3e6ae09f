"""What an arm reads for one engine step, and what it proposes (no vLLM import)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass
class DraftStep:
    """One arm's share of an engine step."""

    rows: np.ndarray  # batch rows this arm drafts for, ascending
    starts: np.ndarray  # per row of ``rows``: tokens whose KV the arm already holds
    seq_lens: np.ndarray  # whole batch, int32: tokens known, this step's new ones included
    token_ids: np.ndarray  # the runner's token_ids_cpu, read in place
    block_table: Any  # the batch's block table (a device tensor)
    sampling_metadata: Any
    k: int
    want_q: bool  # return the drafter's probabilities q


@dataclasses.dataclass
class Draft:
    ids: torch.Tensor | np.ndarray  # [n, w] token ids, w <= k
    lengths: np.ndarray | None = None  # valid prefix per row; None: all w
    q: torch.Tensor | None = None  # [n, w, V] drafter probabilities; None: deterministic
    q_top: tuple | None = None  # greedy batches: ([n, w, m] probs, [n, w, m] ids), q's top m
    computed: np.ndarray | None = None  # per row: tokens whose drafter KV is now valid
