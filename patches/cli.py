"""Patch: ``vllm serve MODEL --speculative-config metasd.json`` (a file path).

vLLM's CLI parses ``--speculative-config`` with ``json.loads`` while it parses
arguments, before general plugins load, so a path would be rejected as bad
JSON. The plugin's ``vllm.platform_plugins`` entry runs earlier: the CLI
resolves vLLM's platform while importing its modules. That entry activates no
platform; it rewrites this one argument in ``sys.argv``:

- inline JSON (starts with ``{``) is left alone;
- a path to a JSON file holding a vLLM speculative config (it has a
  ``"method"``) becomes that file's content;
- any other path becomes ``{"method": "metasd", "config": "<absolute path>"}``,
  so a missing or broken metasd.json is reported by the MetaSD config loader,
  naming the file.

It imports nothing from vLLM (vLLM is resolving its platform at that moment).
With ``VLLM_TARGET_DEVICE=cpu`` vLLM skips platform plugins: pass inline JSON
``{"method": "metasd", "config": "metasd.json"}`` then.
"""
from __future__ import annotations

import json
import os
import sys

FLAGS = ("--speculative-config", "-sc")


def speculative_config_json(value: str) -> str:
    """The JSON vLLM's parser expects for one ``--speculative-config`` value."""
    if value.lstrip().startswith("{") or value in ("", "None"):
        return value
    path = os.path.abspath(os.path.expanduser(value))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None  # the MetaSD loader reports it with the path named
    if isinstance(data, dict) and "method" in data:
        return json.dumps(data)
    return json.dumps({"method": "metasd", "config": path})


def rewrite_argv(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag in FLAGS and eq:
            out[i] = f"{flag}={speculative_config_json(value)}"
        elif arg in FLAGS and i + 1 < len(out):
            out[i + 1] = speculative_config_json(out[i + 1])
    return out


def apply() -> None:
    """Idempotent: a rewritten value is JSON and stays as it is."""
    sys.argv[:] = rewrite_argv(sys.argv)
