"""Several upstreams in process: the plan follows the chosen replica's cache, unsent requests are rerouted,
sent ones never retried, big bodies planned off the loop route the same way, and one upstream is unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.proxy.pipeline import PLAN_IN_THREAD_BYTES
from gateway.settings import load_settings
from tests.integration.conftest import _as_network
from tests.integration.test_intercept_proxy import OK, chat, forwarded, order_in, xml_docs

pytestmark = pytest.mark.anyio

HOSTS = ("http://a.test", "http://b.test", "http://c.test")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engines() -> dict[str, respx.Route]:
    router = respx.Router(assert_all_called=False)
    routes = {host: router.post(f"{host}/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
              for host in HOSTS}  # fmt: skip
    for host in HOSTS:
        router.get(f"{host}/health").mock(return_value=httpx.Response(200))  # the gateway's active health checks
    routes["router"] = router  # type: ignore[assignment]
    return routes


Cluster = Callable[..., Any]


@pytest.fixture
def cluster(engines: dict[str, Any]) -> Cluster:
    @asynccontextmanager
    async def factory(hosts: tuple[str, ...] = HOSTS, **overrides: Any) -> AsyncIterator[AsyncTestClient[Any]]:
        settings = load_settings(environ={}, upstream=list(hosts), **overrides)
        app = create_app(settings, transport=httpx.MockTransport(_as_network(engines["router"])))
        async with AsyncTestClient(app=app) as client:
            yield client

    return factory


def _result(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    result: dict[str, Any] = json.loads(response.headers["x-prefixgate-result"])
    return result


async def test_the_request_goes_where_its_blocks_are_and_is_ordered_for_that_cache(
    cluster: Cluster, engines: dict[str, respx.Route]
) -> None:
    async with cluster() as client:
        first = _result(await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta"]), "q1")))
        other = _result(await client.post("/v1/chat/completions", content=chat(xml_docs(["gamma", "delta"]), "q2")))
        assert first["replica"] != other["replica"], "misses spread over the replicas"
        home = HOSTS[int(first["replica"][1:])]
        sent_first = order_in(forwarded(engines[home], 0)["messages"][0]["content"])
        again = _result(
            await client.post("/v1/chat/completions", content=chat(xml_docs(["beta", "gamma", "alpha"]), "q3"))
        )
        assert again["replica"] == first["replica"] and again["predicted_cached_blocks"] == 2
        assert order_in(forwarded(engines[home])["messages"][0]["content"])[:2] == sent_first
        metrics = (await client.get("/metrics")).text
        assert 'prefixgate_routing_decisions_total{reason="cache"} 1.0' in metrics
        health = (await client.get("/health")).json()
        assert [r["name"] for r in health["replicas"]] == ["r0", "r1", "r2"]


async def test_an_unsent_request_is_rerouted_and_a_sent_one_never_retried(
    cluster: Cluster, engines: dict[str, respx.Route]
) -> None:
    async with cluster(eject_after=1) as client:
        first = _result(await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta"]), "q1")))
        home = HOSTS[int(first["replica"][1:])]
        engines[home].mock(side_effect=httpx.ConnectError("refused"))
        moved = _result(await client.post("/v1/chat/completions", content=chat(xml_docs(["beta", "alpha"]), "q2")))
        assert moved["replica"] != first["replica"]
        assert "prefixgate_reroutes_total 1.0" in (await client.get("/metrics")).text
        health = {r["name"]: r for r in (await client.get("/health")).json()["replicas"]}
        assert not health[first["replica"]]["healthy"], "ejected after eject_after refused connections"
        # a request that reached its replica and then failed is answered with the error, never sent elsewhere
        target = HOSTS[int(moved["replica"][1:])]
        calls = {host: engines[host].call_count for host in HOSTS}
        engines[target].mock(side_effect=httpx.ReadTimeout("slow"))
        failed = await client.post("/v1/chat/completions", content=chat(xml_docs(["beta", "alpha"]), "q3"))
        assert failed.status_code == 504
        assert {h: engines[h].call_count - calls[h] for h in HOSTS} == {h: int(h == target) for h in HOSTS}


async def test_no_replica_reachable_is_a_clean_502(cluster: Cluster, engines: dict[str, respx.Route]) -> None:
    for host in HOSTS[:2]:
        engines[host].mock(side_effect=httpx.ConnectError("refused"))
    async with cluster(hosts=HOSTS[:2]) as client:
        response = await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta"])))
        assert response.status_code == 502 and response.json()["error"]["type"] == "upstream_error"
        assert "prefixgate_reroutes_total 1.0" in (await client.get("/metrics")).text


async def test_a_big_body_planned_off_the_loop_is_routed_the_same_way(
    cluster: Cluster, engines: dict[str, respx.Route]
) -> None:
    padding = "x" * PLAN_IN_THREAD_BYTES
    async with cluster() as client:
        first = _result(
            await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "gamma"]), "q", pad=padding))
        )
        again = _result(
            await client.post("/v1/chat/completions", content=chat(xml_docs(["gamma", "alpha"]), "r", pad=padding))
        )
        assert again["replica"] == first["replica"] and again["predicted_cached_blocks"] == 2
        health = (await client.get("/health")).json()
        assert all(r["in_flight"] == 0 and r["queued_tokens"] == 0 for r in health["replicas"])


async def test_a_single_upstream_answers_exactly_as_before(cluster: Cluster) -> None:
    async with cluster(hosts=HOSTS[:1]) as client:
        result = _result(await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta"]))))
        assert "replica" not in result
        assert "replicas" not in (await client.get("/health")).json()
