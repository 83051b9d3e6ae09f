"""Patch: MetaSD statistics over vLLM's worker RPC.

Adds two methods to ``WorkerBase`` so callers can use the stock
``LLM.collective_rpc("metasd_stats")`` (and the engine-core utility path)
without enabling insecure callable serialization:

- ``metasd_stats()``: per-drafter and per-request statistics (dict) of this
  worker's MetaSD proposer, or None when MetaSD is not active;
- ``metasd_reset_stats()``: zero the aggregate counters (benchmarks);
- ``metasd_choices()``: the recent (request id, drafter) choices, oldest first;
- ``metasd_reconfigure(**settings)``: switch metasd.json settings other than
  the drafters and k (``policy``, ``reward``, ``objective``, ``warm_start``,
  ``prompt_probe``, ...) without restarting.
"""
from __future__ import annotations

from vllm.v1.worker.worker_base import WorkerBase

from vllm_metasd.patches.model_runner import metasd_drafter


def _drafter(worker):
    return metasd_drafter(getattr(worker, "model_runner", None))


def metasd_stats(self):
    drafter = _drafter(self)
    return None if drafter is None else drafter.stats()


def metasd_reset_stats(self):
    drafter = _drafter(self)
    if drafter is not None:
        drafter.reset_stats()


def metasd_choices(self):
    drafter = _drafter(self)
    return None if drafter is None else drafter.choices()


def metasd_reconfigure(self, **settings):
    drafter = _drafter(self)
    if drafter is None:
        raise RuntimeError("MetaSD is not active in this engine")
    drafter.reconfigure(**settings)


def apply() -> None:
    if not hasattr(WorkerBase, "metasd_stats"):
        WorkerBase.metasd_stats = metasd_stats
        WorkerBase.metasd_reset_stats = metasd_reset_stats
        WorkerBase.metasd_choices = metasd_choices
        WorkerBase.metasd_reconfigure = metasd_reconfigure
