"""The hook's sender against a real local HTTP server: batching, keep-alive, retries, overflow, gateway down."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from engines.hooks import EvictionReporter
from tests.enginehooks.collector import collector


@contextmanager
def reporter(url: str, **kwargs: object) -> Iterator[EvictionReporter]:
    sender = EvictionReporter(url, **kwargs)  # type: ignore[arg-type]
    try:
        yield sender
    finally:
        sender.close(2.0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_batches_over_one_kept_alive_connection_with_the_token() -> None:
    with collector("/prefix/") as gateway, reporter(gateway.url, token="t0k") as sender:
        for rid in ("req-1", "req-2", "req-2", "req-3"):
            sender.report([rid])
        assert sender.flush()
        sender.report(["req-4"])
        assert sender.flush()
        assert gateway.ids == ["req-1", "req-2", "req-3", "req-4"]  # de-duplicated within a batch
        assert len(gateway.received) == 2  # the first burst was coalesced into one POST
        assert {r.path for r in gateway.received} == {"/prefix/evict"}
        assert {r.authorization for r in gateway.received} == {"Bearer t0k"}
        assert len({r.client_port for r in gateway.received}) == 1  # one connection, reused
        assert sender.stats["sent"] == 4


def test_large_bursts_are_split_into_bounded_batches() -> None:
    with collector() as gateway, reporter(gateway.url, max_batch=100) as sender:
        sender.report(f"req-{i}" for i in range(250))
        assert sender.flush()
        assert len(gateway.ids) == 250
        assert [len(r.request_ids) for r in gateway.received] == [100, 100, 50]


def test_server_errors_are_retried_with_backoff() -> None:
    with collector() as gateway, reporter(gateway.url, backoff_s=(0.01, 0.05)) as sender:
        gateway.statuses = [503, 500, 429]
        sender.report(["req-1"])
        assert sender.flush()
        assert gateway.ids == ["req-1"]
        assert gateway.attempts == 4
        assert sender.stats["failed_posts"] == 3


def test_client_errors_are_dropped_not_retried() -> None:
    with collector() as gateway, reporter(gateway.url) as sender:
        gateway.statuses = [401]
        sender.report(["req-1"])
        assert sender.flush()
        sender.report(["req-2"])
        assert sender.flush()
        assert gateway.ids == ["req-2"]
        assert sender.stats["rejected"] == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_silently() -> None:
    with collector(idle_timeout=0.1) as gateway, reporter(gateway.url) as sender:
        sender.report(["req-1"])
        assert sender.flush()
        time.sleep(0.4)  # the server drops the kept-alive connection
        sender.report(["req-2"])
        assert sender.flush()
        assert gateway.ids == ["req-1", "req-2"]
        assert sender.stats["failed_posts"] == 0


def test_gateway_down_never_blocks_the_engine_and_recovers() -> None:
    port = _free_port()
    with reporter(f"http://127.0.0.1:{port}", backoff_s=(0.02, 0.1), max_queue=20_000) as sender:
        started = time.perf_counter()
        for i in range(10_000):
            sender.report([f"req-{i}"])
        elapsed = time.perf_counter() - started
        # queueing costs microseconds each; a report that tried the network would cost a connect attempt each
        assert elapsed < 0.3, f"10,000 reports took {elapsed * 1000:.1f} ms"
        time.sleep(0.2)
        assert sender.stats["failed_posts"] >= 1
        with collector(port=port) as gateway:  # the gateway comes (back) up on the same address
            assert sender.flush(10)
            assert sorted(gateway.ids) == sorted(f"req-{i}" for i in range(10_000))
            sender.close(2.0)


def test_overflow_is_dropped_and_counted() -> None:
    port = _free_port()
    with reporter(f"http://127.0.0.1:{port}", max_queue=100, backoff_s=(5.0, 5.0)) as sender:
        assert sender.report(f"req-{i}" for i in range(100)) == 100
        deadline = time.monotonic() + 5
        while not sender.stats["failed_posts"] and time.monotonic() < deadline:
            time.sleep(0.01)  # the sender took those 100 as its batch and is backing off
        assert sender.report(f"req-{i}" for i in range(100, 250)) == 100
        assert sender.stats == {**sender.stats, "accepted": 200, "dropped": 50}


def test_close_is_bounded_while_the_gateway_is_down() -> None:
    port = _free_port()
    sender = EvictionReporter(f"http://127.0.0.1:{port}", backoff_s=(10.0, 10.0))
    sender.report(["req-1"])
    time.sleep(0.05)
    started = time.perf_counter()
    sender.close(1.0)
    assert time.perf_counter() - started < 1.5


def test_a_slow_gateway_does_not_slow_reporting() -> None:
    with collector() as gateway, reporter(gateway.url) as sender:
        gateway.delay_s = 1.0
        sender.report(["req-0"])
        time.sleep(0.05)  # the sender is now waiting on the slow POST
        started = time.perf_counter()
        for i in range(1, 1000):
            sender.report([f"req-{i}"])
        assert time.perf_counter() - started < 0.5  # a report that waited for the POST would take ~1 s
        assert sender.flush(10)
        assert len(gateway.ids) == 1000


def test_an_idle_sender_does_not_spin() -> None:
    with collector() as gateway, reporter(gateway.url) as sender:
        sender.report(["req-1"])
        assert sender.flush()
        started = time.process_time()
        time.sleep(0.3)
        assert time.process_time() - started < 0.05
