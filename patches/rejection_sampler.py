"""Patch: the rejection sampler.

Alignment feedback: read the target's probabilities at the narrowest point of
verification.

``rejection_sample`` receives the drafts, the drafter probabilities q and the
target logits already processed by temperature/top-k/top-p. The wrapper runs
it unchanged, handing the same tensors (before) and its output (after) to
``vllm_metasd.feedback``, which computes the alignment reward only while a
MetaSD runner is capturing (nothing is computed for any other engine).

The CPU/vLLM-bug workarounds of verification live in ``cpu_sampler``.
"""
from __future__ import annotations

from vllm.v1.sample import rejection_sampler as rs

from vllm_metasd import feedback
from vllm_metasd.patches._util import wrap


def _rejection_sample(original):
    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len,
                         cu_num_draft_tokens, draft_probs, target_logits,
                         bonus_token_ids, sampling_metadata, *args, **kwargs):
        if feedback.capturing():
            # Before sampling: vLLM's CPU kernels may reuse target_logits in place.
            feedback.observe_drafts(draft_token_ids, num_draft_tokens, cu_num_draft_tokens,
                                    draft_probs, target_logits)
        output = original(draft_token_ids, num_draft_tokens, max_spec_len,
                          cu_num_draft_tokens, draft_probs, target_logits,
                          bonus_token_ids, sampling_metadata, *args, **kwargs)
        feedback.observe_output(output)
        return output

    return rejection_sample


def apply() -> None:
    wrap(rs, "rejection_sample", _rejection_sample)
