"""The drafters MetaSD chooses between, behind one interface.

    arm.draft(step: DraftStep) -> Draft

``DraftStep`` is what every arm may read for its rows (the runner's token
buffer in place, the block table, sampling metadata); ``Draft`` is what it
proposes. Two kinds:

- ``DraftLMArm``: a draft LM, vLLM's own ``DraftModelProposer`` under a layer
  prefix of its own (its KV lives in vLLM's paged cache beside the target's,
  sharing each request's block table). Before drafting it catches up on the
  tokens of each row it has not processed (the switching cost of MetaSD), in
  forward passes that fit its token buffers.
- ``NgramArm``: prompt lookup with vLLM's own numba matcher, reading the
  runner's ``token_ids_cpu`` in place, as vLLM's ``NgramProposer`` does.

Tensors handed to vLLM live on the runner's device; the CPU side (token
buffer, per-row lengths) is numpy, copied through ``CpuGpuBuffer`` pairs.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
from numba import njit
from vllm.config import SpeculativeConfig
from vllm.model_executor.model_loader import get_model
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.ngram_proposer import (
    _find_longest_matched_ngram_and_propose_tokens as _match_one,
)
from vllm.v1.utils import CpuGpuBuffer

from vllm_metasd.core import plan_catch_up
from vllm_metasd.core.draft import Draft, DraftStep
from vllm_metasd.core.objective import probe_accepted


def drafter_speculative_config(spec: SpeculativeConfig, model: str) -> SpeculativeConfig:
    """vLLM's draft-model config for one more drafter, sharing spec's settings.

    (vLLM's ``replace`` re-runs ``__post_init__``, which cannot re-validate a
    draft-model SpeculativeConfig built from a resolved one, so the config is
    built from the user-level fields.)
    """
    return SpeculativeConfig(
        method="draft_model",
        model=model,
        num_speculative_tokens=spec.num_speculative_tokens,
        draft_sample_method=spec.draft_sample_method,
        draft_tensor_parallel_size=spec.draft_parallel_config.tensor_parallel_size,
        max_model_len=spec.max_model_len,
        enforce_eager=spec.enforce_eager,
        target_model_config=spec.target_model_config,
        target_parallel_config=spec.target_parallel_config,
    )


def first_max(logits: torch.Tensor) -> torch.Tensor:
    """vLLM's greedy draft, ``logits.argmax(-1)`` (the first maximal index),
    by ``max``: on CPU torch's argmax over bf16 logits is 4x slower (measured
    one thread: 227 vs 52 us at [16, 4096], 2.7 vs 0.6 ms at [16, 49152],
    SmolLM2's vocabulary), and a draft LM samples k times a step."""
    return logits.max(dim=-1).indices


class DraftLMArm(DraftModelProposer):
    """One draft LM. ``top_q`` = m > 0: at temperature 0 also keep its
    distribution q at its m most likely tokens (the block-divergence reward
    needs q; vLLM computes the full q only when sampling)."""

    deterministic = False

    def __init__(self, vllm_config, device, runner, prefix: str, top_q: int = 0):
        self.prefix = prefix
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.top_q = top_q
        self._top: list[tuple[torch.Tensor, torch.Tensor]] = []  # per draft position
        self.forward_s = 0.0  # time in this arm's drafting forwards (telemetry)
        max_tokens = self.max_num_tokens
        max_reqs = vllm_config.scheduler_config.max_num_seqs
        # A forward's inputs, packed so that each dtype crosses to the device
        # in one copy (``catch_up_inputs`` has the layout).
        self._i32 = CpuGpuBuffer(3 * max_reqs + 1 + max_tokens, dtype=torch.int32, device=device)
        self._i64 = CpuGpuBuffer(max_reqs + 3 * max_tokens, dtype=torch.int64, device=device)
        one = np.ones(1, dtype=np.int64)  # compile now, with the types of every later call
        catch_up_inputs(one - 1, one - 1, one + 1, np.zeros((1, 2), dtype=np.int32), 1, 1,
                        self._i32.np, self._i64.np)

    def _get_model(self) -> torch.nn.Module:
        from vllm.compilation.backends import set_model_tag

        with set_model_tag(self.prefix):
            return get_model(vllm_config=self._create_draft_vllm_config(), prefix=self.prefix)

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        if self.top_q and sampling_metadata.all_greedy:
            logits = self.model.compute_logits(hidden_states).float()
            top, ids = logits.topk(self.top_q, dim=-1)
            self._top.append(((top - logits.logsumexp(-1, keepdim=True)).exp(), ids))
            return first_max(logits), None
        return super()._sample_draft_tokens(hidden_states, sampling_metadata)

    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_local_argmax_reduction or self.use_heterogeneous_vocab:
            return super()._greedy_sample(hidden_states)
        return first_max(self.model.compute_logits(hidden_states))

    def draft(self, step: DraftStep) -> Draft:
        lens = step.seq_lens[step.rows].astype(np.int64)
        # At least one known token is re-fed so no row's query is empty
        # (rewriting a KV slot with the same token is idempotent).
        starts = np.clip(np.minimum(step.starts, lens - 2), 0, None)
        passes = plan_catch_up(starts, lens, self.max_num_tokens)
        if len(passes) == 1:
            idx, s, e, _ = passes[0]
            ids, q, q_top = self._forward(step, step.rows[idx], s, e, step.k)
            return Draft(ids, q=q, q_top=q_top, computed=lens)
        outs, order = [], []
        for idx, s, e, drafts in passes:  # long catch-ups: KV-filling passes first
            out = self._forward(step, step.rows[idx], s, e, step.k if drafts else 1)
            if drafts:
                outs.append(out)
                order.append(idx)
        back = torch.as_tensor(np.argsort(np.concatenate(order)), device=self.device)
        ids, q, q_top = zip(*outs)
        return Draft(torch.cat(ids)[back],
                     q=None if q[0] is None else torch.cat(q)[back],
                     q_top=None if q_top[0] is None else tuple(
                         torch.cat(part)[back] for part in zip(*q_top)),
                     computed=lens)

    def probe(self, step: DraftStep, window: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A new request's prompt-informed start: process every known token of
        the rows (the catch-up this drafter would need once chosen; its KV is
        then filled) and score the drafter on the request's own text: the
        drafted tokens its greedy k-token drafts would have had accepted at the
        last ``window`` positions (``probe_accepted``). Returns (tokens
        processed, accepted) per row."""
        lens = step.seq_lens[step.rows].astype(np.int64)
        accepted = np.full(len(lens), np.nan)
        out: list[torch.Tensor] = []
        hook = self.model.register_forward_hook(lambda _m, _i, h: out.append(h))
        try:
            for idx, s, e, last in plan_catch_up(np.zeros_like(lens), lens, self.max_num_tokens):
                out.clear()
                self._forward(step, step.rows[idx], s, e, 0)  # k = 0: the pass only
                if last:
                    accepted[idx] = self._accepted(step.token_ids, step.rows[idx], s, e,
                                                   out[0], window, k)
        finally:
            hook.remove()
        return lens, accepted

    def _accepted(self, token_ids: np.ndarray, rows: np.ndarray, starts: np.ndarray,
                  ends: np.ndarray, hidden: torch.Tensor, window: int, k: int) -> np.ndarray:
        """Row i's pass holds positions [starts[i], ends[i]) contiguously; the
        hidden state at position p predicts token p + 1."""
        first = np.maximum(starts, ends - 1 - window)
        n = ends - 1 - first  # scored positions per row (>= 1)
        row = np.repeat(np.arange(len(rows)), n)
        pos = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + first[row]
        offset = np.concatenate(([0], np.cumsum(ends - starts)[:-1]))
        index = torch.as_tensor(offset[row] + pos - starts[row], device=hidden.device)
        guess = first_max(self.model.compute_logits(hidden[index])).cpu().numpy()
        return probe_accepted(guess == token_ids[rows[row], pos + 1], row, len(rows), k)

    def _forward(self, step: DraftStep, rows: np.ndarray, starts: np.ndarray,
                 ends: np.ndarray, k: int):
        """One forward over tokens [start, end) of each row, then k drafts after end-1.
        Tokens [start, end-1) are vLLM's "target" inputs; token end-1 is the newest,
        appended by the draft-model first pass."""
        n = len(rows)
        block_table = step.block_table
        total, max_q, max_seq = catch_up_inputs(rows, starts, ends, step.token_ids,
                                                block_table.shape[1], self.block_size,
                                                self._i32.np, self._i64.np)
        i32 = self._i32.copy_to_gpu(3 * n + 1 + total)
        i64 = self._i64.copy_to_gpu(n + 3 * total)
        qsl, seq_lens, next_ids, tokens = (i32[:n + 1], i32[n + 1:2 * n + 1],
                                           i32[2 * n + 1:3 * n + 1], i32[3 * n + 1:])
        rows_t, positions, flat, offset = (i64[:n], i64[n:n + total],
                                           i64[n + total:n + 2 * total], i64[n + 2 * total:])
        # Each token's KV slot: its block (the request's block table) and offset
        slot_mapping = block_table.reshape(-1)[flat] * self.block_size + offset
        cpu = self._i32.cpu
        cad = CommonAttentionMetadata(
            query_start_loc=qsl,
            query_start_loc_cpu=cpu[:n + 1],
            seq_lens=seq_lens,
            seq_lens_cpu_upper_bound=cpu[n + 1:2 * n + 1].clone(),  # vLLM bumps it in place
            num_reqs=n,
            num_actual_tokens=total,
            max_query_len=max_q,
            max_seq_len=max_seq,
            # rows ascend: the first n rows are the table's own first n (a view)
            block_table_tensor=block_table[:n] if rows[-1] == n - 1 else block_table[rows_t],
            slot_mapping=slot_mapping,
            causal=True,
        )
        t0 = time.perf_counter()
        self._top.clear()
        ids = self.propose(
            num_speculative_tokens=k,
            target_token_ids=tokens,
            target_positions=positions,
            target_hidden_states=self.hidden_states[:total],
            next_token_ids=next_ids,
            token_indices_to_sample=None,
            common_attn_metadata=cad,
            sampling_metadata=_select_rows(step.sampling_metadata, rows_t),
        )
        q = self.take_last_draft_probs() if step.want_q else None
        q_top = None
        if self._top:  # greedy: q at its top m tokens, [n, k, m]
            q_top = (torch.stack([v for v, _ in self._top], 1),
                     torch.stack([i for _, i in self._top], 1))
        self.forward_s += time.perf_counter() - t0
        return ids, q, q_top


@njit(cache=True)
def catch_up_inputs(rows, starts, ends, token_ids, blocks_per_row, block_size, i32, i64):
    """A draft LM's forward over tokens [starts[i], ends[i] - 1) of each row
    ``rows[i]``, then its newest token ends[i] - 1, written into two packed
    buffers (one pass, no temporaries):

    - i32: query start locations [n + 1] | sequence lengths [n] | newest
      tokens [n] | the tokens [total]
    - i64: rows [n] | positions [total] | index of each token's block in the
      flattened block table [total] | offset in that block [total]

    Returns (total tokens, longest query, longest sequence)."""
    n = rows.shape[0]
    total = 0
    for i in range(n):
        total += ends[i] - 1 - starts[i]
    tok, pos, flat, off = 3 * n + 1, n, n + total, n + 2 * total
    t = max_q = max_seq = 0
    i32[0] = 0
    for i in range(n):
        r, s, e = rows[i], starts[i], ends[i] - 1
        for p in range(s, e):
            i32[tok + t] = token_ids[r, p]
            i64[pos + t] = p
            i64[flat + t] = r * blocks_per_row + p // block_size
            i64[off + t] = p % block_size
            t += 1
        i32[1 + i] = t
        i32[n + 1 + i] = e
        i32[2 * n + 1 + i] = token_ids[r, e]
        i64[i] = r
        max_q = max(max_q, e - s)
        max_seq = max(max_seq, e)
    return total, max_q, max_seq


@njit
def propose_ngrams(rows, seq_lens, token_ids, min_n, max_n, max_model_len, k, ids, num):
    """vLLM's ``batch_propose_numba`` for ``rows`` (int64), one row after the
    other: the same per-row matcher, without the thread-pool launch of its
    ``prange`` (which vLLM, like MetaSD, runs on one thread below 8192 tokens;
    after a forward pass the launch costs more than the lookup)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        out = _match_one(token_ids[r, :seq_lens[r]], min_n, max_n, max_model_len, k)
        num[r] = out.shape[0]
        if out.shape[0]:
            ids[r, :out.shape[0]] = out


class NgramArm:
    deterministic = True  # drafts are exact lookups: q is one-hot

    """Prompt lookup (vLLM's numba matcher) over the runner's token buffer."""

    def __init__(self, vllm_config, k: int, min_n: int, max_n: int):
        self.min_n, self.max_n, self.k = min_n, max_n, k
        self.max_model_len = vllm_config.model_config.max_model_len
        max_reqs = vllm_config.scheduler_config.max_num_seqs
        self._ids = np.zeros((max_reqs, k), dtype=np.int32)
        self._num = np.zeros(max_reqs, dtype=np.int32)
        # Compile once now, with the argument types of every later call.
        self._match(np.zeros(1, dtype=np.int64), np.full(1, 2, dtype=np.int32),
                    np.zeros((1, 2), dtype=np.int32), k)

    def _match(self, rows: np.ndarray, seq_lens, token_ids, k: int, ids=None, num=None) -> None:
        propose_ngrams(rows.astype(np.int64, copy=False), seq_lens, token_ids, self.min_n,
                       self.max_n, self.max_model_len, k, self._ids if ids is None else ids,
                       self._num if num is None else num)

    def draft(self, step: DraftStep) -> Draft:
        self._match(step.rows, step.seq_lens, step.token_ids, step.k)
        return Draft(self._ids[step.rows, :step.k], lengths=self._num[step.rows])

    def probe(self, step: DraftStep, window: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As ``DraftLMArm.probe``, per row ``lookup_probe`` (NaN where the
        lookup proposes nothing: no estimate of what it yields when it
        proposes). Runs once per new request."""
        lens = step.seq_lens[step.rows].astype(np.int64)
        return lens, np.array([
            lookup_probe(step.token_ids[row, :n], window, k, self.min_n, self.max_n,
                         self.max_model_len)
            for row, n in zip(step.rows.tolist(), lens.tolist())])


def lookup_drafts(tokens: np.ndarray, ends: np.ndarray, k: int, min_n: int, max_n: int,
                  max_model_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The n-gram arm's k-token drafts after each history ``tokens[:e]`` (e in
    ``ends``), scored against the tokens of ``tokens`` that follow. Per draft:
    the tokens it proposes, those of them with a following token to compare,
    which of these hit ([drafts, k]), and its accepted tokens (the leading run
    of hits)."""
    n = len(tokens)
    ends = np.asarray(ends, dtype=np.int32)
    history = np.ascontiguousarray(np.broadcast_to(tokens.astype(np.int32), (len(ends), n)))
    ids = np.zeros((len(ends), k), dtype=np.int32)
    num = np.zeros(len(ends), dtype=np.int32)
    propose_ngrams(np.arange(len(ends), dtype=np.int64), ends, history, min_n, max_n,
                   max_model_len, k, ids, num)
    compared = np.minimum(num, n - ends)
    pos = np.minimum(ends[:, None] + np.arange(k), n - 1)  # each draft token's position
    hits = (np.arange(k) < compared[:, None]) & (ids == tokens[pos])
    return num, compared, hits, np.cumprod(hits, axis=1).sum(axis=1)


def lookup_probe(tokens: np.ndarray, window: int, k: int, min_n: int, max_n: int,
                 max_model_len: int) -> float:
    """The n-gram arm's prompt probe: the drafted tokens its k-token drafts
    would have had accepted at the last ``window`` positions of ``tokens``
    where it proposes (its value when it proposes, as the throughput objective
    offers it; NaN if it proposes nowhere); as in ``probe_accepted``, drafts
    cut short by the end of the text count only if there is no other."""
    n = len(tokens)
    ends = np.arange(max(n - 1 - window, 1), n - 1)  # history lengths
    num, _, _, accepted = lookup_drafts(tokens, ends, k, min_n, max_n, max_model_len)
    proposes = num > 0
    full = proposes & (ends + k <= n)
    counted = full if full.any() else proposes
    return float(accepted[counted].mean()) if counted.any() else math.nan


def _select_rows(sampling_metadata, rows: torch.Tensor):
    """The sampling metadata restricted to one arm's rows (only temperature is
    used when drafting, as in vLLM's own draft-model proposer)."""
    if sampling_metadata.all_greedy or sampling_metadata.temperature is None:
        return sampling_metadata
    return dataclasses.replace(sampling_metadata,
                               temperature=sampling_metadata.temperature[rows])


def build_arms(vllm_config, device, runner, drafters, top_q: int) -> list:
    """One arm per metasd.json drafter. A draft LM's vLLM config is the
    runner's with its own speculative config (``dataclasses.replace``: the
    rest, forward context included, is shared)."""
    spec = vllm_config.speculative_config
    k = spec.num_speculative_tokens
    arms = []
    for i, d in enumerate(drafters):
        if d.kind == "ngram":
            arms.append(NgramArm(vllm_config, k, d.prompt_lookup_min, d.prompt_lookup_max))
            continue
        arm_cfg = dataclasses.replace(
            vllm_config, speculative_config=drafter_speculative_config(spec, d.path))
        arms.append(DraftLMArm(arm_cfg, device, runner,
                               prefix=f"metasd_drafter_{i}_{d.name}", top_q=top_q))
    return arms
