"""Shared by vllm_metasd.ray_replicas, ray_serve and ray_data (no Ray or vLLM import here).

- the MetaSD config is validated on the driver and travels inline, drafter paths
  made absolute (a Ray worker's working directory is not the driver's);
- the driver's ``VLLM_*`` variables (e.g. ``VLLM_CPU_KVCACHE_SPACE``) are forwarded
  into the Ray workers' ``runtime_env`` (a multi-node cluster does not inherit them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "metasd.json"


def metasd_speculative_config(config: Any = DEFAULT_CONFIG) -> dict:
    """``{"method": "metasd", "config": {...}}`` for vLLM's ``speculative_config``:
    ``config`` (a metasd.json path, inline JSON or a dict) validated here, so a bad
    file fails on the driver with its MetaSDConfigError, before any actor starts."""
    from vllm_metasd.config import load_config

    return {"method": "metasd", "config": load_config(config).to_json_dict()}


def model_source(model: str) -> str:
    """A local model directory made absolute; a hub id is left as it is."""
    path = Path(os.path.expanduser(model))
    return str(path.resolve()) if path.exists() else model


def runtime_env_with_vllm_vars(runtime_env: dict | None = None,
                               extra: dict[str, str] | None = None) -> dict:
    """``runtime_env`` plus the driver's ``VLLM_*`` variables and ``extra`` (the
    caller's own ``env_vars`` win)."""
    runtime_env = dict(runtime_env or {})
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    env.update(extra or {})
    env.update(runtime_env.get("env_vars") or {})
    runtime_env["env_vars"] = env
    return runtime_env


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
