"""Patch: MetaSD per-drafter statistics on vLLM's Prometheus ``/metrics``.

The statistics live in the worker (``metasd_stats`` RPC, see ``worker.py``);
vLLM's ``/metrics`` renders a prometheus_client registry in the API-server
process. Two thin wrappers, in the API-server process only:

- ``build_app`` (as ``vllm.entrypoints.launchers.api_server.entry`` calls
  it): adds a small pure-ASGI middleware. A request to ``/metrics`` first
  awaits ``engine_client.collective_rpc("metasd_stats")`` (an engine-core
  utility call, answered between steps; 10 s timeout, the last snapshot is kept
  on failure) and stores the snapshot; then vLLM's own handler renders.
- ``get_prometheus_registry`` (as vLLM's ``/metrics`` router calls it): the
  registry it returns also gets ``COLLECTOR``, which yields the stored
  snapshot. That is the global registry with one API server, a fresh
  multiprocess registry with ``--api-server-count`` > 1; both are covered.

Exported (label ``drafter``: the metasd.json name), cumulative since start
(or since ``metasd_reset_stats``):

    metasd_drafter_chosen_total           engine steps the bandit chose it
    metasd_drafter_draft_tokens_total     its draft tokens the target verified
    metasd_drafter_accepted_tokens_total  of those, accepted
    metasd_drafter_mean_reward            mean alignment reward (NaN: none yet)
    metasd_live_requests                  requests holding MetaSD state

The draft/accepted counters sum to vLLM's ``vllm:spec_decode_num_draft_tokens``
/ ``..._accepted_tokens`` totals (both count verified drafts).

Why not vLLM's ``vllm.endpoint_plugins`` group: such plugins load only when
named in ``VLLM_PLUGINS`` (opt-in) and add routes, while ``/metrics`` is
vLLM's own route and should just work. Engine-core and worker processes never
import vLLM's server module before plugins load, so ``apply`` leaves them
alone (no FastAPI import there); ``vllm serve`` imports it first.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sys
from typing import Any

from vllm_metasd.patches._util import wrap

logger = logging.getLogger("vllm.metasd")

ENTRY_MODULE = "vllm.entrypoints.launchers.api_server.entry"
METRICS_MODULE = "vllm.entrypoints.serve.instrumentator.metrics"
RPC_TIMEOUT_S = 10.0  # Prometheus' default scrape timeout


class MetaSDCollector:
    """prometheus_client collector yielding the last ``metasd_stats`` snapshot."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None

    def describe(self):  # no names up front: collect() is empty until the first scrape
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot
        if not snap:
            return
        families = {
            "chosen": CounterMetricFamily(
                "metasd_drafter_chosen", "Engine steps in which the bandit chose the drafter",
                labels=["drafter"]),
            "drafted": CounterMetricFamily(
                "metasd_drafter_draft_tokens", "Draft tokens of the drafter verified by the "
                "target", labels=["drafter"]),
            "accepted": CounterMetricFamily(
                "metasd_drafter_accepted_tokens", "Draft tokens of the drafter accepted by the "
                "target", labels=["drafter"]),
            "mean_reward": GaugeMetricFamily(
                "metasd_drafter_mean_reward", "Mean alignment reward of the drafter (NaN "
                "until it is rewarded)", labels=["drafter"]),
        }
        for name in snap.get("arms", snap["drafters"]):
            d = snap["drafters"][name]
            for key, family in families.items():
                value = d[key]  # None: no data yet (never rewarded)
                family.add_metric([name], math.nan if value is None else float(value))
        yield from families.values()
        yield CounterMetricFamily(
            "metasd_placeholder_draft_tokens", "Draft tokens vLLM verified that no drafter "
            "made (its -1 placeholders: requests resumed after preemption, or new with one "
            "uncached token); with the per-drafter sums they add up to vLLM's draft tokens",
            value=float(snap.get("placeholder_drafts", 0)))
        yield CounterMetricFamily(
            "metasd_plain_steps", "Engine steps the speculation gate ran without speculation "
            "(plain decoding measured faster at that batch size)",
            value=float(snap.get("plain_steps", 0)))
        yield GaugeMetricFamily("metasd_live_requests",
                                "Requests currently holding MetaSD bandit state",
                                value=float(snap["live_requests"]))


COLLECTOR = MetaSDCollector()
_registries: list = []  # registries COLLECTOR is registered in


async def refresh(engine_client) -> None:
    """Fetch the worker's statistics into COLLECTOR (no-op without MetaSD)."""
    spec = getattr(getattr(engine_client, "vllm_config", None), "speculative_config", None)
    if not getattr(spec, "metasd", None):
        return
    try:
        results = await asyncio.wait_for(engine_client.collective_rpc("metasd_stats"),
                                         RPC_TIMEOUT_S)
    except Exception as e:  # a scrape must not fail because of MetaSD
        logger.warning("MetaSD: metasd_stats RPC failed (%r); /metrics shows the last "
                       "snapshot", e)
        return
    COLLECTOR.snapshot = next((r for r in results or () if r), None)


class MetricsRefreshMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware: streaming and disconnects untouched)."""

    def __init__(self, app, state) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state; engine_client is set later

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/metrics"):
            engine_client = getattr(self.state, "engine_client", None)
            if engine_client is not None:
                await refresh(engine_client)
        await self.app(scope, receive, send)


def _build_app(original):
    def build_app(*args, **kwargs):
        app = original(*args, **kwargs)
        if getattr(app, "middleware_stack", None) is not None:
            # vLLM 0.32's build_app already built the stack (Starlette then
            # refuses add_middleware): wrap the built stack, outermost.
            app.middleware_stack = MetricsRefreshMiddleware(app.middleware_stack, app.state)
        else:
            app.add_middleware(MetricsRefreshMiddleware, state=app.state)
        return app

    return build_app


def _get_prometheus_registry(original):
    def get_prometheus_registry():
        registry = original()
        if not any(r is registry for r in _registries):
            registry.register(COLLECTOR)
            _registries.append(registry)
        return registry

    return get_prometheus_registry


def apply() -> None:
    entry = sys.modules.get(ENTRY_MODULE)
    if entry is None or not hasattr(entry, "build_app"):
        return  # not an API-server process
    import importlib

    metrics = importlib.import_module(METRICS_MODULE)
    wrap(metrics, "get_prometheus_registry", _get_prometheus_registry)
    wrap(entry, "build_app", _build_app)
