"""A large ``/reorder`` runs off the event loop: the gateway keeps answering while it plans.

Planning, hashing and decoding run in a worker thread and commits are chunked, so ``/health`` answers in a few
milliseconds throughout. What remains are garbage-collection passes over the batch's ~1M objects, each holding
the GIL for 20-30 ms: on this 2-core machine one probe in ~60 occasionally takes 50-90 ms. The test therefore
requires 95% of probes within 50 ms and every probe within 200 ms (a real stall of the loop takes seconds).
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.e2e.servers import free_port, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_health_answers_within_50ms_p95_during_a_20000_context_reorder() -> None:
    rng = random.Random(7)
    contexts = [[rng.randrange(3000) for _ in range(rng.randint(5, 15))] for _ in range(20_000)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # its own process, as deployed: the client's JSON work must not share the gateway's GIL
    command = [sys.executable, "-m", "gateway.cli", "serve", "--upstream", "http://127.0.0.1:9", "--port", str(port)]
    gateway = subprocess.Popen([*command, "--log-level", "warning"])
    try:
        wait_healthy(f"{base}/health")
        latencies, result = _probe_during_reorder(base, contexts)
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)
    assert result == {"status": 200, "n": 20_000}
    assert len(latencies) >= 10, "the reorder finished too fast to observe the gateway while it ran"
    ordered = sorted(latencies)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    assert p95 < 0.05, f"/health p95 was {p95 * 1000:.1f} ms during the reorder"
    assert ordered[-1] < 0.2, f"/health took {ordered[-1] * 1000:.1f} ms during the reorder"


def _probe_during_reorder(base: str, contexts: list[list[int]]) -> tuple[list[float], dict[str, int]]:
    with httpx.Client(timeout=60) as client:
        done = threading.Event()
        result: dict[str, int] = {}

        def big_reorder() -> None:
            response = client.post(f"{base}/reorder", json={"contexts": contexts})
            result["status"] = response.status_code
            result["n"] = len(response.json()["reordered_contexts"])
            done.set()

        worker = threading.Thread(target=big_reorder)
        worker.start()
        latencies: list[float] = []
        with httpx.Client(timeout=5) as probe:
            while not done.is_set():
                started = time.perf_counter()
                assert probe.get(f"{base}/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
        worker.join()
    return latencies, result
