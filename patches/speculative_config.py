"""Patch: let ``speculative_config`` select MetaSD.

vLLM validates ``SpeculativeConfig.method`` against a closed list, so the
plugin translates a MetaSD request at the one place both the CLI
(``--speculative-config``) and ``LLM(speculative_config=...)`` pass through,
``EngineArgs.create_speculative_config``:

    {"method": "metasd", "config": "metasd.json"}       # a path
    {"method": "metasd", "config": {...}}               # metasd.json inline

becomes vLLM's own ``draft_model`` method on the first draft LM (so vLLM sets
up draft-model KV, vocabulary checks and probabilistic draft sampling), as a
``MetaSDSpeculativeConfig``: vLLM's class plus one field, ``metasd``, holding
the validated MetaSD config as a plain dict. Being a real field, it survives
pickling into the engine-core and worker processes and vLLM's own config
hashing. The model-runner patch then swaps in the MetaSD proposer.
"""
from __future__ import annotations

from typing import Any

from vllm.config import SpeculativeConfig
from vllm.config.utils import config
from vllm.engine.arg_utils import EngineArgs

from vllm_metasd.patches._util import wrap


@config
class MetaSDSpeculativeConfig(SpeculativeConfig):
    metasd: dict[str, Any] | None = None
    """The validated metasd.json (see vllm_metasd.config)."""


def _create_speculative_config(original):
    def create_speculative_config(self, target_model_config, target_parallel_config):
        spec = self.speculative_config
        if not (isinstance(spec, dict) and spec.get("method") == "metasd"):
            return original(self, target_model_config, target_parallel_config)
        from vllm_metasd.config import (
            check_drafters_against_target, check_engine_limits, from_speculative_config,
        )

        metasd = from_speculative_config(spec)
        # Before vLLM loads anything: every drafter must share the target's vocabulary,
        # and k, the n-gram lengths and the drafters' contexts must fit max_model_len.
        check_drafters_against_target(metasd, target_model_config.get_vocab_size(),
                                      target_model_config.tokenizer)
        check_engine_limits(metasd, target_model_config.max_model_len)
        return MetaSDSpeculativeConfig(
            **metasd.vllm_speculative_kwargs(),
            metasd=metasd.to_json_dict(),
            target_model_config=target_model_config,
            target_parallel_config=target_parallel_config,
        )

    return create_speculative_config


def apply() -> None:
    wrap(EngineArgs, "create_speculative_config", _create_speculative_config)
