"""Patch: run the MetaSD proposer inside vLLM V1's model runner.

Runner choice: ``VllmConfig.use_v2_model_runner`` is forced to False for a
MetaSD engine. On CUDA, vLLM 0.32 may pick the V2 model runner, which has none
of the V1 hooks below; MetaSD runs on the V1 runner there too. An explicit
``VLLM_USE_V2_MODEL_RUNNER=1`` is refused with a clear error instead of being
silently ignored. (On CPU vLLM always uses V1: no Triton.)

Five thin wrappers on ``GPUModelRunner`` (which ``CPUModelRunner`` inherits):

- ``__init__``: when the speculative config carries a MetaSD config, replace
  the draft-model proposer vLLM built by ``MetaSDProposer`` (same interface,
  N drafters).
- ``_update_states``: before vLLM updates its batch, tell the proposer which
  requests finished, were aborted or preempted (bandit state and drafter KV
  bookkeeping are freed there).
- ``_prepare_inputs``: a step in which no row has drafts (the speculation
  gate's plain steps, prefills) is prepared as a plain engine prepares it,
  without spec-decode metadata (vLLM 0.32 builds it for every step of a
  speculative engine: ~0.14 ms per step at batch 16 on this CPU, for nothing
  to verify). Not under async scheduling (vLLM's own draft-input preparation
  runs there) nor for a model with a recurrent layer (Mamba, GDN: it needs
  vLLM's zero-draft bookkeeping).
- ``propose_draft_token_ids``: ask the proposer first whether this step
  speculates (its speculation gate); then the proposer drafts from the
  runner's token buffer, block table and sampling metadata, without vLLM's
  input preparation for a single drafter, which it would not read (under
  async scheduling vLLM's preparation still runs: it records the counts the
  next step needs, and its propose call reaches the proposer's).
- ``_sample``: capture the alignment feedback computed during rejection
  sampling and hand it to the proposer, so each request's bandit is updated
  before its next arm choice (the drafting of this same step). A step in
  which no row has drafts is sampled by vLLM's plain sampler (vLLM sends
  every step of a speculative engine through the rejection sampler).
"""
from __future__ import annotations

from vllm import envs
from vllm.config import VllmConfig
from vllm.v1.kv_cache_interface import AttentionSpec, UniformTypeKVCacheSpecs
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_metasd import feedback
from vllm_metasd.patches._util import wrap


def metasd_drafter(runner):
    """The runner's MetaSD proposer, or None (any other engine)."""
    return getattr(runner, "_metasd_proposer", None)


def _init(original):
    def __init__(self, vllm_config, device, *args, **kwargs):
        original(self, vllm_config, device, *args, **kwargs)
        spec = vllm_config.speculative_config
        if spec is not None and getattr(spec, "metasd", None) and hasattr(self, "drafter"):
            from vllm_metasd.proposer import MetaSDProposer

            self.drafter = self._metasd_proposer = MetaSDProposer(vllm_config, device, self)

    return __init__


def _use_v2_model_runner(original):
    def use_v2_model_runner(self) -> bool:
        if not getattr(self.speculative_config, "metasd", None):
            return original(self)
        if envs.VLLM_USE_V2_MODEL_RUNNER:
            raise ValueError(
                "MetaSD runs inside vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 "
                "asks for V2; unset it (or set it to 0) to use speculative method 'metasd'")
        return False

    return use_v2_model_runner


def _update_states(original):
    def update_states(self, scheduler_output):
        drafter = metasd_drafter(self)
        if drafter is not None:
            drafter.on_schedule(scheduler_output)
        return original(self, scheduler_output)

    return update_states


def _attention_only(runner) -> bool:
    """Whether every KV cache group of the runner is attention's (no recurrent state)."""
    if (known := getattr(runner, "_metasd_attention_only", None)) is None:
        specs = []
        for group in runner.kv_cache_config.kv_cache_groups:
            spec = group.kv_cache_spec
            specs += (spec.kv_cache_specs.values() if isinstance(spec, UniformTypeKVCacheSpecs)
                      else [spec])
        known = runner._metasd_attention_only = all(isinstance(s, AttentionSpec) for s in specs)
    return known


def _prepare_inputs(original):
    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        if (scheduler_output.scheduled_spec_decode_tokens or metasd_drafter(self) is None
                or self.use_async_scheduling or not _attention_only(self)):
            return original(self, scheduler_output, *args, **kwargs)
        # No row has drafts: no spec-decode metadata (vLLM reads the config here).
        spec, self.speculative_config = self.speculative_config, None
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = spec

    return prepare_inputs


def _sample(original):
    def sample(self, logits, spec_decode_metadata):
        drafter = metasd_drafter(self)
        if drafter is None or spec_decode_metadata is None:
            return original(self, logits, spec_decode_metadata)
        if spec_decode_metadata.max_spec_len == 0:
            # Nothing drafted (a plain step, e.g. the speculation gate's): the
            # logits are one row per request, sampled as plain decoding does;
            # the rejection sampler would only add its overhead.
            return original(self, logits, None)
        with feedback.capture(drafter.reward_kind) as verification:
            verification.q_top = drafter.q_top_for(self.input_batch.req_ids,
                                                   spec_decode_metadata.num_draft_tokens)
            output = original(self, logits, spec_decode_metadata)
        if verification.rewards is not None:
            drafter.observe(self.input_batch.req_ids, verification)
        return output

    return sample


def _propose_draft_token_ids(original):
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        args = (scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                common_attn_metadata, slot_mappings)
        drafter = metasd_drafter(self)
        if drafter is None:
            return original(self, *args)
        speculates = drafter.start_step(scheduler_output.total_num_scheduled_tokens,
                                        sampled_token_ids, self.discard_request_mask.np)
        if self.valid_sampled_token_count_event is not None:
            # Async scheduling: vLLM's preparation records counts the next
            # step reads; its propose call reaches the drafter's.
            return original(self, *args)
        if not speculates:
            return drafter.plain_step()
        # The arms read the runner's token buffer, block table and sampling
        # metadata: none of what vLLM prepares for a single drafter.
        drafts = drafter.draft(scheduler_output.num_spec_tokens_to_schedule,
                               common_attn_metadata.block_table_tensor, sampling_metadata)
        if (draft_probs := drafter.take_last_draft_probs()) is not None:
            self._draft_probs = draft_probs  # as vLLM's own path keeps them
            self._draft_prob_req_ids = self.input_batch.req_ids.copy()
        return drafts

    return propose_draft_token_ids


def apply() -> None:
    wrap(VllmConfig, "use_v2_model_runner", _use_v2_model_runner)
    wrap(GPUModelRunner, "__init__", _init)
    wrap(GPUModelRunner, "_update_states", _update_states)
    wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    wrap(GPUModelRunner, "_sample", _sample)
    wrap(GPUModelRunner, "propose_draft_token_ids", _propose_draft_token_ids)
