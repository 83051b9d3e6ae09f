"""The model set a benchmark runs on (``--target``): the bundled zoo (21M target)
or SmolLM2-135M-Instruct, shared by run.py, parity.py and selection.py."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = "zoo"  # "zoo" or "smollm2"; set once by the script's main (use())


def models():
    """The model set benchmarked: vllm_metasd.zoo or vllm_metasd.smollm2."""
    from vllm_metasd.smollm2.workload import select

    return select(TARGET)


def use(target: str):
    """Select the target for the whole run; returns its model set (SmolLM2's
    target fetched first if it is not on this machine yet)."""
    global TARGET
    TARGET = target
    chosen = models()
    if target == "smollm2":
        chosen.ensure_target()
    return chosen


def results_path(name: str) -> Path:
    """Default output file: results/<name> (zoo), results/smollm2/<name>."""
    return RESULTS / ("smollm2/" if TARGET == "smollm2" else "") / name
