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

It also installs, in the ``vllm`` CLI process only, a ``sys.excepthook`` that
prints an uncaught ``MetaSDConfigError`` (a bad metasd.json, raised while the
CLI builds the engine config) as one line, ``MetaSD config error: <field>:
<problem>; <fix>``, instead of vLLM's ~40-line traceback; the exit code stays
1. Python callers of ``LLM(...)`` are untouched: they get the exception object.
(``plugin.register`` installs the hook too, so it is there when
``VLLM_TARGET_DEVICE=cpu`` skips this platform-plugin entry.)
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


def is_vllm_cli(argv: list[str] | None = None) -> bool:
    """This process is vLLM's CLI: the ``vllm`` script or
    ``python -m vllm.entrypoints.cli.main``."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return False
    prog = argv[0].replace(os.sep, "/")
    return os.path.basename(prog) == "vllm" or prog.endswith("vllm/entrypoints/cli/main.py")


def _is_metasd_config_error(exc_type) -> bool:
    return any(c.__name__ == "MetaSDConfigError" and c.__module__ == "vllm_metasd.config"
               for c in getattr(exc_type, "__mro__", ()))


def _excepthook(exc_type, exc, tb, _previous=None):
    if _is_metasd_config_error(exc_type):
        sys.stdout.flush()
        print(f"MetaSD config error: {exc}", file=sys.stderr, flush=True)
        return  # Python then exits with status 1
    (_previous or sys.__excepthook__)(exc_type, exc, tb)


def install_excepthook() -> None:
    """In the vLLM CLI process: a bad metasd.json ends the CLI with one line.
    Idempotent; chains to the hook installed before."""
    if not is_vllm_cli() or getattr(sys.excepthook, "_metasd", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        _excepthook(exc_type, exc, tb, previous)

    hook._metasd = True
    sys.excepthook = hook


def apply() -> None:
    """Idempotent: a rewritten value is JSON and stays as it is."""
    sys.argv[:] = rewrite_argv(sys.argv)
    install_excepthook()
