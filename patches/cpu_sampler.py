"""Patch: vLLM 0.32.0 bugs in speculative verification (rejection sampling) seen on CPU.

Correctness fixes only; nothing MetaSD-specific (any speculative method is affected).
On CPU vLLM has no Triton backend and ``CpuPlatform.register_triton_kernel_overrides``
routes the rejection sampler's Triton kernels to C++ ports in
``vllm.utils.cpu_triton_utils``. Two of them differ from the Triton kernels:

1. Placeholder drafts (CPU only). vLLM pads the drafts of a request resumed after
   preemption with -1 (``PLACEHOLDER_TOKEN_ID``). The Triton
   ``rejection_random_sample_kernel`` rejects a draft id < 0 (the output takes the
   recovered token, nothing after it is read). The C++ port has no such check: it
   reads ``target_probs[row * vocab - 1]`` (the previous row's last probability),
   accepts the -1 when that is >= the uniform draw and emits -1 plus the bonus token
   (``[1, 99, -1, 9]`` where Triton gives ``[1, 99, 7, -1]``). The wrapper around
   ``_rejection_random_sample_kernel_impl`` (the function the override registers, read
   after the plugin loads) hands the kernel, at every placeholder position only, draft
   id 0 with target probability 0 (saved and restored around the call) and uniform 1.0:
   ``p / q = 0 < 1`` is rejected for any q (the kernel maps q = 0 to ratio 0), so the
   kernel emits the recovered token there and stops reading the row, as Triton does.
   Recovered tokens are computed before this kernel runs and treat -1 as Triton does
   (no vocabulary entry is excluded); the greedy kernel already rejects -1 (it never
   equals the argmax).

2. ``expand_batch_to_tokens`` (CPU only): it dispatches to
   ``cpu_triton_utils._expand_kernel_impl``, which hands the C++ kernel an int64 *copy*
   of the output and never copies it back. The expanded per-token temperature / top-k /
   top-p stay uninitialised memory, so every temperature > 0 speculative request
   verifies against garbage logits. Replaced by the same computation in torch.

3. Empty verification (all platforms; reached through the torch top-k-only path vLLM
   takes on CPU): with speculation configured the runner always builds spec-decode
   metadata, so a step in which no request has a draft token runs the rejection
   sampler on zero positions, and with a top-k request in the batch ``k.max()`` of an
   empty tensor raises and kills the engine. ``apply_sampling_constraints`` returns the
   empty logits unchanged instead (what it would return if it did not raise).
"""
from __future__ import annotations

import functools

import torch
from vllm.platforms import current_platform
from vllm.utils import cpu_triton_utils as cpu_tl
from vllm.v1.sample import rejection_sampler as rs

from vllm_metasd.patches._util import original as _original
from vllm_metasd.patches._util import wrap


def _rejection_random_sample_kernel_impl(original):
    @functools.wraps(original)
    def impl(output_token_ids, cu_num_draft_tokens, draft_token_ids, draft_probs,
             target_probs, bonus_token_ids, recovered_token_ids, uniform_probs, is_greedy,
             max_spec_len, vocab_size, synthetic_conditional_rates=None,
             NO_DRAFT_PROBS=False, SYNTHETIC_MODE=False):
        placeholder = (draft_token_ids < 0).nonzero().flatten()
        if placeholder.numel() == 0:
            return original(output_token_ids, cu_num_draft_tokens, draft_token_ids,
                            draft_probs, target_probs, bonus_token_ids, recovered_token_ids,
                            uniform_probs, is_greedy, max_spec_len, vocab_size,
                            synthetic_conditional_rates, NO_DRAFT_PROBS, SYNTHETIC_MODE)
        draft_token_ids = draft_token_ids.clone()
        draft_token_ids[placeholder] = 0
        uniform_probs = uniform_probs.clone()
        uniform_probs[placeholder] = 1.0
        saved = target_probs[placeholder, 0].clone()
        target_probs[placeholder, 0] = 0.0
        try:
            return original(output_token_ids, cu_num_draft_tokens, draft_token_ids,
                            draft_probs, target_probs, bonus_token_ids, recovered_token_ids,
                            uniform_probs, is_greedy, max_spec_len, vocab_size,
                            synthetic_conditional_rates, NO_DRAFT_PROBS, SYNTHETIC_MODE)
        finally:
            target_probs[placeholder, 0] = saved

    return impl


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


def _rewire_registered_override() -> None:
    """If vLLM already registered its CPU kernel overrides in this process (the worker
    registers them right after loading plugins, so normally not), point the registered
    override at the wrapper too."""
    override = getattr(rs, "rejection_random_sample_kernel", None)
    patched = cpu_tl._rejection_random_sample_kernel_impl
    if getattr(override, "_impl", None) is _original(patched):
        override._impl = override.func = patched


def apply() -> None:
    wrap(rs, "apply_sampling_constraints", _apply_sampling_constraints)
    if current_platform.is_cpu():
        wrap(rs, "expand_batch_to_tokens", _expand_batch_to_tokens)
        wrap(cpu_tl, "_rejection_random_sample_kernel_impl",
             _rejection_random_sample_kernel_impl)
        _rewire_registered_override()
