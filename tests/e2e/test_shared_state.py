"""Two gateways sharing one view through a real Redis server: commits and evictions converge, late starts catch up."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import anyio
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


def test_changes_are_applied_in_order_on_the_loop_and_the_threads_stop_with_the_task(redis_url: str) -> None:  # noqa: F811
    from gateway.state.replication import Replication

    async def scenario() -> None:
        apps = [create_app(load_settings(environ={}, upstream="http://10.0.0.1:8000")) for _ in range(2)]
        a, b = (Replication(redis_url, app.state.replicas, app.state.metrics, max_len=10_000) for app in apps)
        source, target = (app.state.replicas.replicas[0].residency for app in apps)
        applied_on: set[int] = set()
        commit = target.commit

        def commit_here(*args: Any) -> None:
            applied_on.add(threading.get_ident())
            commit(*args)

        target.commit = commit_here  # type: ignore[method-assign]
        ended: list[str] = []
        for name in ("_publish_loop", "_follow_loop"):
            work = getattr(b, name)
            setattr(b, name, lambda stop, work=work, name=name: (work(stop), ended.append(name)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run)
            tg.start_soon(b.run)
            for i in range(300):  # each id committed, then evicted unless it is a multiple of 3: order matters
                source.commit(f"req-{i}", [(b"k", (i, i + 1))])
                if i % 3:
                    source.evict([f"req-{i}"])
            with anyio.fail_after(10):
                while apps[1].state.metrics.state_applied._value.get() < 500:
                    await anyio.sleep(0.01)
            assert set(target.index.request_ids()) == {f"req-{i}" for i in range(0, 300, 3)}
            assert applied_on == {threading.get_ident()}, "applied on the event loop (the index's one writer)"
            tg.cancel_scope.cancel()
        with anyio.fail_after(2):  # each thread notices within one XREAD block or queue wait
            while len(ended) < 2:
                await anyio.sleep(0.01)
        for replication in (a, b):
            await replication.aclose()

    anyio.run(scenario)
