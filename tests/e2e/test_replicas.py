"""Several real simulated-engine processes behind one gateway: routing follows the cache, failover works."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.servers import free_port, serve_in_thread, wait_for, wait_healthy

pytestmark = pytest.mark.timeout(90)


@dataclass
class Engine:
    """One ``python -m engines.sim`` process on a fixed port (so that it can be restarted there)."""

    port: int
    evict_url: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        command = [sys.executable, "-m", "engines.sim", "--port", str(self.port), "--prefill-us", "1"]
        command += ["--capacity-tokens", "200000", "--evict-url", self.evict_url, "--log-level", "warning"]
        self.process = subprocess.Popen(command)

    def start(self) -> None:
        self.spawn()
        wait_healthy(self.url + "/health")

    def stop(self, kill: bool = False) -> None:
        if self.process is not None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, list[Engine]]]:
    """Three engines and a gateway, shared by the tests below in order (the failover test runs last)."""
    gateway_port = free_port()
    engines = [Engine(free_port(), f"http://127.0.0.1:{gateway_port}/evict?replica=r{i}") for i in range(3)]
    try:
        for engine in engines:
            engine.spawn()  # the three start in parallel
        for engine in engines:
            wait_healthy(engine.url + "/health", timeout=30)
        settings = load_settings(
            environ={},
            upstream=[e.url for e in engines],
            port=gateway_port,
            health_interval=0.5,
            eject_after=3,
        )
        with serve_in_thread(create_app(settings), port=gateway_port) as gateway:
            yield gateway, engines
    finally:
        for engine in engines:
            engine.stop()


def _body(docs: list[int], question: str) -> dict[str, Any]:
    inner = "\n".join(f'<document id="d{d}">{f"topic {d} fact. " * 60}</document>' for d in docs)
    return {
        "model": "sim",
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": f"Answer from the documents.\n<documents>\n{inner}\n</documents>"},
            {"role": "user", "content": question},
        ],
    }


def _ask(gateway: str, docs: list[int], question: str) -> tuple[str, int, dict[str, Any]]:
    """Send one RAG request; return the replica it went to, the engine's cached tokens, and the result header."""
    response = httpx.post(f"{gateway}/v1/chat/completions", json=_body(docs, question), timeout=30)
    assert response.status_code == 200, response.text
    result = json.loads(response.headers["x-prefixgate-result"])
    cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return result["replica"], cached, result


def _health(gateway: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in httpx.get(f"{gateway}/health").json()["replicas"]}


def test_routing_follows_the_cache_and_spreads_misses(cluster: tuple[str, list[Engine]]) -> None:
    gateway, _ = cluster
    topics = [[1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]]
    homes = [_ask(gateway, topic, f"first question on topic {t}")[0] for t, topic in enumerate(topics)]
    assert len(set(homes)) == 3, "cache misses at low load spread over the replicas"
    for t, topic in enumerate(topics):
        shuffled = list(reversed(topic))  # the same documents in another retrieval order
        replica, cached, result = _ask(gateway, shuffled, f"second question on topic {t}")
        assert replica == homes[t], "the request goes where its documents are cached"
        assert result["predicted_cached_blocks"] == 6 and result["reordered"]
        assert cached > 1500, "the engine confirms the reordered prompt hit its cache"
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'prefixgate_routing_decisions_total{reason="cache"} 3.0' in metrics


def test_evictions_release_the_entries_of_the_replica_that_reported_them(cluster: tuple[str, list[Engine]]) -> None:
    gateway, _ = cluster
    response = httpx.post(f"{gateway}/v1/chat/completions", json=_body([41, 42, 43], "q"), timeout=30)
    request_id = response.headers["x-request-id"]
    home = json.loads(response.headers["x-prefixgate-result"])["replica"]
    held = _health(gateway)[home]["index_requests"]
    other = next(name for name in ("r0", "r1", "r2") if name != home)
    wrong = httpx.post(f"{gateway}/evict?replica={other}", json={"request_ids": [request_id]}).json()
    assert wrong["removed_count"] == 0 and _health(gateway)[home]["index_requests"] == held
    # no replica named: the gateway knows which replica it sent the request to (engine-mangled ids too)
    right = httpx.post(f"{gateway}/evict", json={"request_ids": [f"chatcmpl-{request_id}"]}).json()
    assert right["evicted_request_ids"] == [request_id]
    assert _health(gateway)[home]["index_requests"] == held - 1
    unknown = httpx.post(f"{gateway}/evict?replica=r9", json={"request_ids": ["x"]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "replica"


def test_unreachable_replica_is_rerouted_ejected_and_readmitted_with_an_empty_index(
    cluster: tuple[str, list[Engine]],
) -> None:
    gateway, engines = cluster
    topic = [31, 32, 33, 34]
    home, _, _ = _ask(gateway, topic, "where does this go")
    victim = engines[int(home[1:])]
    assert _health(gateway)[home]["index_requests"] >= 1
    victim.stop(kill=True)
    # sent before the health checks notice (three failed checks, a second at least): the connection is refused, so the request goes to the next replica
    replica, _, result = _ask(gateway, topic, "and now")
    assert replica != home and result["blocks"] == 4
    assert "prefixgate_reroutes_total 1.0" in httpx.get(f"{gateway}/metrics").text
    wait_for(lambda: not _health(gateway)[home]["healthy"])
    for i in range(4):
        assert _ask(gateway, topic, f"while it is down {i}")[0] != home
    victim.start()  # restarted on the same port, with an empty cache
    wait_for(lambda: _health(gateway)[home]["healthy"])
    assert _health(gateway)[home]["index_requests"] == 0, "a restarted replica's index is dropped"
