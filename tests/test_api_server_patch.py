"""patches/api_server.py without a server: the collector's exposition and the
/metrics refresh middleware on a bare Starlette app with a fake engine client.
(tests/test_server.py checks the same through a real `vllm serve`.)"""
import asyncio
import math
from types import SimpleNamespace

import pytest

SNAPSHOT = {
    "arms": ["code", "lookup"],
    "live_requests": 2,
    "plain_steps": 7,
    "drafters": {
        "code": {"chosen": 5, "drafted": 12, "accepted": 9, "acceptance_rate": 0.75,
                 "reward_count": 4, "mean_reward": 0.6},
        "lookup": {"chosen": 1, "drafted": 0, "accepted": 0, "acceptance_rate": 0.0,
                   "reward_count": 0, "mean_reward": None},
    },
}


@pytest.fixture
def api_server():
    from vllm_metasd.patches import api_server

    api_server.COLLECTOR.snapshot = None
    yield api_server
    api_server.COLLECTOR.snapshot = None


def samples(text):
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_collector_exposes_per_drafter_metrics(api_server):
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(api_server.COLLECTOR)
    assert generate_latest(registry) == b""  # nothing before the first refresh
    api_server.COLLECTOR.snapshot = SNAPSHOT
    got = samples(generate_latest(registry).decode())
    code, lookup = (("drafter", "code"),), (("drafter", "lookup"),)
    assert got[("metasd_drafter_chosen_total", code)] == 5
    assert got[("metasd_drafter_draft_tokens_total", code)] == 12
    assert got[("metasd_drafter_accepted_tokens_total", code)] == 9
    assert got[("metasd_drafter_mean_reward", code)] == 0.6
    assert math.isnan(got[("metasd_drafter_mean_reward", lookup)])  # never rewarded
    assert got[("metasd_drafter_chosen_total", lookup)] == 1
    assert got[("metasd_live_requests", ())] == 2
    assert got[("metasd_plain_steps_total", ())] == 7


def fake_engine(results=None, error=None, metasd=True):
    async def collective_rpc(method, timeout=None, args=(), kwargs=None):
        assert method == "metasd_stats"
        if error:
            raise error
        return results

    spec = SimpleNamespace(metasd={"drafters": []} if metasd else None)
    return SimpleNamespace(vllm_config=SimpleNamespace(speculative_config=spec),
                           collective_rpc=collective_rpc)


@pytest.mark.parametrize("prebuilt", [False, True])  # vLLM 0.32 builds the stack early
def test_metrics_request_refreshes_from_the_worker_first(api_server, prebuilt):
    from prometheus_client import CollectorRegistry, generate_latest
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    registry = CollectorRegistry()
    registry.register(api_server.COLLECTOR)
    app = Starlette(routes=[
        Route("/metrics", lambda r: PlainTextResponse(generate_latest(registry).decode())),
        Route("/other", lambda r: PlainTextResponse("ok"))])
    if prebuilt:
        app.middleware_stack = app.build_middleware_stack()
    assert api_server._build_app(lambda: app)() is app
    client = TestClient(app)

    assert client.get("/metrics").text == ""  # engine_client not set yet: no RPC
    app.state.engine_client = fake_engine([None, SNAPSHOT])  # first non-empty result
    assert client.get("/other").text == "ok" and api_server.COLLECTOR.snapshot is None
    assert 'metasd_drafter_chosen_total{drafter="code"} 5.0' in client.get("/metrics").text
    # a failing RPC keeps the last snapshot and the scrape still succeeds
    app.state.engine_client = fake_engine(error=RuntimeError("engine busy"))
    resp = client.get("/metrics")
    assert resp.status_code == 200 and "metasd_live_requests 2.0" in resp.text


def test_no_rpc_without_metasd(api_server):
    asyncio.run(api_server.refresh(fake_engine(error=AssertionError("called"), metasd=False)))
    assert api_server.COLLECTOR.snapshot is None


def test_collector_added_once_to_the_registry_vllm_serves(api_server):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    get = api_server._get_prometheus_registry(lambda: registry)
    assert get() is registry and get() is registry
    assert list(registry._collector_to_names).count(api_server.COLLECTOR) == 1
