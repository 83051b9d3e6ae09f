"""The ``vllm.general_plugins`` entry point.

vLLM calls ``register()`` in every process it starts (API server / LLM
frontend, engine core, each worker, Ray workers included), so all MetaSD
patches are in place wherever a model runner or config is built.
"""
from __future__ import annotations


def register() -> None:
    from vllm_metasd.patches import apply_all, cli

    cli.install_excepthook()  # vLLM CLI only: a bad metasd.json -> one line
    apply_all()


def register_cli() -> None:
    """The ``vllm.platform_plugins`` entry point: activates no platform (returns
    None). vLLM calls it before its CLI parses arguments, the one moment
    ``--speculative-config metasd.json`` (a path) can still be accepted."""
    from vllm_metasd.patches import cli

    cli.apply()
