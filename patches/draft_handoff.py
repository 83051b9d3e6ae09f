"""Patch: a MetaSD step's drafts travel back with the step's output.

vLLM 0.32's engine core fetches a speculative engine's drafts with one more
worker RPC after every step (``EngineCore.post_step`` ->
``Executor.take_draft_token_ids``); with the worker in its own process
(vLLM's default layout on CPU) that round trip cost 0.17 ms per step at
batch 16 here, for plain steps too. For a MetaSD engine the worker attaches
the drafts it just made to the step's ``ModelRunnerOutput``
(``Worker.sample_tokens``) and the executor hands them to
``take_draft_token_ids`` without the RPC. Not under async scheduling (vLLM
fetches no drafts there) nor for a non-blocking ``sample_tokens`` (the batch
queue); an executor without these wrappers (Ray) keeps the RPC.
"""
from __future__ import annotations

from vllm.v1.executor.multiproc_executor import MultiprocExecutor
from vllm.v1.executor.uniproc_executor import UniProcExecutor
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.gpu_worker import Worker

from vllm_metasd.patches._util import wrap
from vllm_metasd.patches.model_runner import metasd_drafter

DRAFTS = "metasd_draft_token_ids"  # the attribute on the step's output
_NOTHING = object()  # no drafts handed over (None is a valid answer: no drafts)


def _worker_sample_tokens(original):
    def sample_tokens(self, grammar_output):
        output = original(self, grammar_output)
        runner = self.model_runner
        if (type(output) is ModelRunnerOutput and output is not EMPTY_MODEL_RUNNER_OUTPUT
                and metasd_drafter(runner) is not None and not runner.use_async_scheduling):
            setattr(output, DRAFTS, runner.take_draft_token_ids())
        return output

    return sample_tokens


def _executor_sample_tokens(original):
    def sample_tokens(self, grammar_output, non_block: bool = False):
        output = original(self, grammar_output, non_block=non_block)
        self._metasd_drafts = _NOTHING if non_block else getattr(output, DRAFTS, _NOTHING)
        return output

    return sample_tokens


def _take_draft_token_ids(original):
    def take_draft_token_ids(self):
        drafts = getattr(self, "_metasd_drafts", _NOTHING)
        if drafts is _NOTHING:
            return original(self)
        self._metasd_drafts = _NOTHING
        return drafts

    return take_draft_token_ids


def apply() -> None:
    wrap(Worker, "sample_tokens", _worker_sample_tokens)
    for executor in (MultiprocExecutor, UniProcExecutor):
        wrap(executor, "sample_tokens", _executor_sample_tokens)
        wrap(executor, "take_draft_token_ids", _take_draft_token_ids)
