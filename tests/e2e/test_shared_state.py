"""Two gateways sharing one view through a real Redis server: commits and evictions converge, late starts catch up,
client keys map to the same namespaces on every gateway, and entries nobody should trust are checked before use."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import redis

from engines.sim import SimConfig, create_sim_app
from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.redis import redis_url  # noqa: F401
from tests.e2e.servers import free_port, gateway_process, serve_in_thread, wait_for

pytestmark = pytest.mark.timeout(120)

Gateway = Callable[[], AbstractContextManager[str]]
CONVERGE = "the gateways to converge"  # what wait_for waits for


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


def test_commits_and_evictions_converge_and_plans_see_the_other_gateways_requests(gateway: Gateway) -> None:
    with gateway() as a, gateway() as b:
        first, result = _send(a, [1, 2, 3, 4, 5], "what about one")
        assert result["predicted_cached_blocks"] == 0
        wait_for(lambda: first in _live(b), what=CONVERGE)
        # planned in B against what A sent: the same documents in another order are predicted cached, and reordered
        second, result = _send(b, [5, 4, 3, 2, 1], "what about two")
        assert result["predicted_cached_blocks"] == 5 and result["reordered"]
        wait_for(lambda: second in _live(a), what=CONVERGE)
        # an eviction reported to B releases the entry in A
        evicted = httpx.post(f"{b}/evict", json={"request_ids": [first]}).json()
        assert evicted["evicted_request_ids"] == [first]
        wait_for(lambda: first not in _live(a), what=CONVERGE)
        assert second in _live(a)
        # a reset on A reaches B
        assert httpx.post(f"{a}/reset").status_code == 200
        wait_for(lambda: not _live(b), what=CONVERGE)
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
        wait_for(lambda: kept in _live(restarted), what=CONVERGE)
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


# ------------------------------------------------------------------ keys across gateways (real processes)

ALICE = {"authorization": "Bearer alice-key-0001"}
BOB = {"authorization": "Bearer bob-key-0002"}
SECRET = "deployment-secret-0123456789"


def _keyed(engine: str, redis_url: str, *more: str) -> list[str]:  # noqa: F811
    return ["--upstream", engine, "--state", redis_url, "--api-key", "alice-key-0001", "--api-key", "bob-key-0002",
            "--admin-token", "admin-token-0003", *more]  # fmt: skip


def test_a_client_id_maps_to_the_same_engine_id_and_view_on_every_gateway(
    engine: str,
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two ``prefixgate serve`` processes with the same keys, secret and Redis: a key's namespace is the same on
    both, so its ids and its index view are shared; neither the keys nor the secret reach Redis or the logs."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with (
        logs[0].open("wb") as log_a,
        logs[1].open("wb") as log_b,
        gateway_process(*_keyed(engine, redis_url, "--namespace-secret", SECRET, "--log-level", "debug"),
                        stderr=log_a) as a,
        gateway_process(*_keyed(engine, redis_url, "--namespace-secret", SECRET, "--log-level", "debug"),
                        stderr=log_b) as b,
    ):  # fmt: skip
        ids = []
        for gateway, key in ((a, ALICE), (b, ALICE), (a, BOB)):
            response = httpx.post(f"{gateway}/v1/chat/completions", json=_body([1, 2], "which"),
                                  headers={**key, "x-request-id": "client-7"}, timeout=30)  # fmt: skip
            assert response.status_code == 200, response.text
            ids.append(response.headers["x-request-id"])
        assert ids[0] == ids[1], "the same key's id maps to the same engine id on either gateway"
        assert ids[0] != ids[2] and ids[0].endswith("-client-7") and ids[2].endswith("-client-7")
        # what alice sent through A is alice's view in B too (and not bob's)
        sent = httpx.post(f"{a}/v1/chat/completions", json=_body([11, 12, 13, 14, 15], "first"),
                          headers={**ALICE, "x-request-id": "alice-first"})  # fmt: skip
        rid = sent.headers["x-request-id"]
        wait_for(lambda: rid in httpx.get(f"{b}/requests", headers=ALICE).json()["request_ids"], what=CONVERGE)
        again = httpx.post(f"{b}/v1/chat/completions", json=_body([15, 14, 13, 12, 11], "second"), headers=ALICE)
        assert json.loads(again.headers["x-prefixgate-result"])["predicted_cached_blocks"] == 5
        other = httpx.post(f"{b}/v1/chat/completions", json=_body([15, 14, 13, 12, 11], "third"), headers=BOB)
        assert json.loads(other.headers["x-prefixgate-result"])["predicted_cached_blocks"] == 0
    client = redis.Redis.from_url(redis_url)
    stored = b"".join(fields[b"e"] for _, fields in client.xrange("prefixgate:index"))
    client.close()
    assert stored, "the gateways shared their changes"
    for secret in (b"alice-key-0001", b"bob-key-0002", SECRET.encode()):
        assert secret not in stored
        for log in logs:
            assert secret not in log.read_bytes()


def test_keys_with_shared_state_and_no_namespace_secret_refuse_to_start(engine: str, redis_url: str) -> None:  # noqa: F811
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port()), *_keyed(engine, redis_url)]
    done = subprocess.run(command, check=False, capture_output=True, timeout=60)
    assert done.returncode != 0
    assert b"--namespace-secret" in done.stderr and b"alice-key" not in done.stderr


# ------------------------------------------------------------------ untrusted stream entries (real process)


def _entry(engine: str, op: str, request_id: str = "", ids: list[Any] | None = None, groups: Any = ()) -> bytes:
    """An entry as another gateway (or anything that can write to Redis) would append it."""
    return msgspec.msgpack.encode(["intruder", engine, time.time(), op, request_id, ids or [], list(groups)])


def test_invalid_entries_are_skipped_and_counted_without_losing_their_neighbours(
    engine: str,
    redis_url: str,  # noqa: F811
) -> None:
    with gateway_process("--upstream", engine, "--state", redis_url, "--log-level", "error") as gateway:
        client = redis.Redis.from_url(redis_url)
        entries = [
            _entry(engine, "commit", "req-good-1", groups=[(b"k" * 16, [1, 2, 3])]),
            _entry(engine, "commit", "req-dict-key", groups=[({"a": 1}, [1, 2])]),  # crashed the follower
            _entry(engine, "commit", "req-good-2", groups=[(b"k" * 16, [1, 2, 4])]),
            _entry(engine, "commit", "req-huge", groups=[(b"k", [7])] * 300_000),  # stalled /health for 4.1 s
            _entry(engine, "commit", "req-str-blocks", groups=[(b"k", ["x", "y"])]),
            _entry(engine, "evict", ids=[{"id": 1}]),
            _entry(engine, "explode"),
            b"\xc1 not msgpack",
            _entry(engine, "commit", "req-good-3", groups=[(b"k" * 16, [1, 2, 5])]),
        ]
        pipe = client.pipeline(transaction=False)
        for payload in entries:
            pipe.xadd("prefixgate:index", {"e": payload})
        pipe.execute()  # read by the follower as one batch
        client.close()
        good = {"req-good-1", "req-good-2", "req-good-3"}
        wait_for(lambda: good <= _live(gateway), what=CONVERGE)
        assert not {"req-dict-key", "req-huge", "req-str-blocks"} & _live(gateway)
        metrics = httpx.get(f"{gateway}/metrics").text
        assert 'prefixgate_state_errors_total{kind="invalid"} 5.0' in metrics
        assert 'prefixgate_state_errors_total{kind="decode"} 1.0' in metrics
        assert "prefixgate_state_applied_total 3.0" in metrics
        assert httpx.get(f"{gateway}/health", timeout=2).status_code == 200


def test_a_large_batch_is_applied_in_slices_that_keep_health_answering(engine: str, redis_url: str) -> None:  # noqa: F811
    """1,000 commits of 4,096 blocks (the most one request may carry), read 512 at a time: applied in one go, a
    read held the event loop, and every request, for ~0.7 s of CPU; in slices the loop's longest busy stretch
    (its own CPU time between two ticks, ``prefixgate_event_loop_busy_max_seconds``) stays a few milliseconds."""
    count = 1000
    with gateway_process("--upstream", engine, "--state", redis_url, "--log-level", "error") as gateway:
        client = redis.Redis.from_url(redis_url)
        pipe = client.pipeline(transaction=False)
        for i in range(count):
            entry = _entry(engine, "commit", f"req-big-{i}", groups=[(b"k" * 16, list(range(4096)))])
            pipe.xadd("prefixgate:index", {"e": entry})
        with httpx.Client(timeout=10) as http:
            http.get(f"{gateway}/health")
            pipe.execute()
            client.close()
            slowest, applied = 0.0, 0.0
            deadline = time.monotonic() + 60
            while applied < count:
                assert time.monotonic() < deadline, "the batch was not applied in time"
                started = time.perf_counter()
                http.get(f"{gateway}/health")
                slowest = max(slowest, time.perf_counter() - started)
                applied = _metric(http.get(f"{gateway}/metrics").text, "prefixgate_state_applied_total")
                time.sleep(0.01)
            busy = _metric(http.get(f"{gateway}/metrics").text, "prefixgate_event_loop_busy_max_seconds")
        assert busy < 0.1, f"the event loop was held for {busy * 1000:.0f} ms of CPU"
        assert slowest < 0.5, f"/health took {slowest * 1000:.0f} ms while the batch was applied"


def _metric(text: str, name: str) -> float:
    return float(text.split(f"\n{name} ")[1].split("\n", maxsplit=1)[0])
