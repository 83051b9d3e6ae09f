"""Patch: the rejection sampler.

1. Alignment feedback: read the target's probabilities at the narrowest point
   of verification.

``rejection_sample`` receives the drafts, the drafter probabilities q and the
target logits already processed by temperature/top-k/top-p. The wrapper runs
it unchanged, handing the same tensors (before) and its output (after) to
``vllm_metasd.feedback``, which computes the alignment reward only while a
MetaSD runner is capturing (nothing is computed for any other engine).

2. CPU fix (vLLM 0.32.0 bug, CPU platform only): ``expand_batch_to_tokens``
   dispatches to ``cpu_triton_utils._expand_kernel_impl``, which hands the C++
   kernel an int64 *copy* of the output and never copies it back. The expanded
   per-token temperature / top-k / top-p stay uninitialised memory, so every
   non-greedy speculative request on CPU (draft_model, ngram, MetaSD) verifies
   against garbage logits. Replaced by the same computation in torch.

3. Empty verification (vLLM 0.32.0 bug, seen on CPU): with speculation
   configured, the runner always builds spec-decode metadata, so a step in
   which no request has a draft token (every prefill-only step; a step whose
   drafts all came back empty) runs the rejection sampler on zero positions.
   With a top-k request in the batch, vLLM's torch top-k (``k.max()`` of an
   empty tensor) raises and kills the engine: any speculative engine, one
   ``top_k`` request. ``apply_sampling_constraints`` returns the empty logits
   unchanged instead.
"""
from __future__ import annotations

import torch
from vllm.platforms import current_platform
from vllm.v1.sample import rejection_sampler as rs

from vllm_metasd import feedback
from vllm_metasd.patches._util import wrap


def _rejection_sample(original):
    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len,
                         cu_num_draft_tokens, draft_probs, target_logits,
                         bonus_token_ids, sampling_metadata, *args, **kwargs):
        if feedback.capturing():
            is_greedy = None
            if not sampling_metadata.all_greedy:
                # Same greedy test as rejection_sample itself (GREEDY_TEMPERATURE = 0).
                is_greedy = sampling_metadata.temperature == 0
            # Before sampling: vLLM's CPU kernels may reuse target_logits in place.
            feedback.observe_drafts(draft_token_ids, num_draft_tokens, cu_num_draft_tokens,
                                    draft_probs, target_logits, is_greedy)
        output = original(draft_token_ids, num_draft_tokens, max_spec_len,
                          cu_num_draft_tokens, draft_probs, target_logits,
                          bonus_token_ids, sampling_metadata, *args, **kwargs)
        feedback.observe_output(output)
        return output

    return rejection_sample


def _expand_batch_to_tokens(original):
    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
        x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return torch.repeat_interleave(x, counts, output_size=num_tokens)

    return expand_batch_to_tokens


def _apply_sampling_constraints(original):
    def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
        if logits.shape[0] == 0:  # no draft token in the batch: nothing to constrain
            return logits
        return original(logits, cu_num_draft_tokens, sampling_metadata)

    return apply_sampling_constraints


def apply() -> None:
    wrap(rs, "rejection_sample", _rejection_sample)
    wrap(rs, "apply_sampling_constraints", _apply_sampling_constraints)
    if current_platform.is_cpu():
        wrap(rs, "expand_batch_to_tokens", _expand_batch_to_tokens)
