"""Two gateways sharing one view through a real Redis server: commits and evictions converge, late starts catch up."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest

from engines.sim import SimConfig, create_sim_app
from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.redis import redis_url  # noqa: F401
from tests.e2e.servers import serve_in_thread

pytestmark = pytest.mark.timeout(60)

Gateway = Callable[[], AbstractContextManager[str]]


@pytest.fixture
def engine() -> Iterator[str]:
    with serve_in_thread(create_sim_app(SimConfig(prefill_us_per_token=1.0))) as url:
        yield url


@pytest.fixture
def gateway(engine: str, redis_url: str) -> Gateway:  # noqa: F811
    def start() -> AbstractContextManager[str]:
        return serve_in_thread(create_app(load_settings(environ={}, upstream=engine, state=redis_url)))

    return start


def _body(docs: list[int], question: str) -> dict[str, Any]:
    inner = "\n".join(f'<doc id="{d}">{f"subject {d} detail. " * 40}</doc>' for d in docs)
    return {
        "model": "sim",
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": f"Use the sources.\n<documents>\n{inner}\n</documents>"},
            {"role": "user", "content": question},
        ],
    }


def _send(gateway: str, docs: list[int], question: str) -> tuple[str, dict[str, Any]]:
    response = httpx.post(f"{gateway}/v1/chat/completions", json=_body(docs, question), timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"], json.loads(response.headers["x-prefixgate-result"])


def _live(gateway: str) -> set[str]:
    return set(httpx.get(f"{gateway}/requests").json()["request_ids"])


def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the gateways did not converge in time"
        time.sleep(0.01)


def test_commits_and_evictions_converge_and_plans_see_the_other_gateways_requests(gateway: Gateway) -> None:
    with gateway() as a, gateway() as b:
        first, result = _send(a, [1, 2, 3, 4, 5], "what about one")
        assert result["predicted_cached_blocks"] == 0
        _until(lambda: first in _live(b))
        # planned in B against what A sent: the same documents in another order are predicted cached, and reordered
        second, result = _send(b, [5, 4, 3, 2, 1], "what about two")
        assert result["predicted_cached_blocks"] == 5 and result["reordered"]
        _until(lambda: second in _live(a))
        # an eviction reported to B releases the entry in A
        evicted = httpx.post(f"{b}/evict", json={"request_ids": [first]}).json()
        assert evicted["evicted_request_ids"] == [first]
        _until(lambda: first not in _live(a))
        assert second in _live(a)
        # a reset on A reaches B
        assert httpx.post(f"{a}/reset").status_code == 200
        _until(lambda: not _live(b))
        metrics = httpx.get(f"{b}/metrics").text  # applied in B: A's commit and A's reset
        assert "prefixgate_state_applied_total 2.0" in metrics
        assert "prefixgate_state_lag_seconds_count 2.0" in metrics


def test_a_gateway_that_starts_late_or_restarts_catches_up_from_the_stream(gateway: Gateway) -> None:
    with gateway() as a:
        kept, _ = _send(a, [7, 8, 9], "kept")
        gone, _ = _send(a, [10, 11, 12], "gone")
        assert httpx.post(f"{a}/evict", json={"request_ids": [gone]}).json()["removed_count"] == 1
        time.sleep(0.2)  # the changes reach the stream in the background
    with gateway() as restarted:
        _until(lambda: kept in _live(restarted))
        assert gone not in _live(restarted)
        _, result = _send(restarted, [9, 8, 7], "again")
        assert result["predicted_cached_blocks"] == 3
