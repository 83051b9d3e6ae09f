"""The ``vllm.general_plugins`` entry point.

vLLM calls ``register()`` in every process it starts (API server / LLM
frontend, engine core, each worker, Ray workers included), so all MetaSD
patches are in place wherever a model runner or config is built.
"""
from __future__ import annotations


def register() -> None:
    from vllm_metasd.patches import apply_all

    apply_all()
