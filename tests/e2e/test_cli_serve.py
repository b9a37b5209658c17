"""``prefixgate serve`` as users run it: the embedded simulated engine starts and stops with the gateway."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from tests.e2e.servers import free_port, wait_healthy

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_runs_and_stops_the_embedded_engine(stop: signal.Signals) -> None:
    port, sim_port = free_port(), free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--sim-port", str(sim_port)]
    process = subprocess.Popen([*command, "--log-level", "warning"])
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health")
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "sim", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3},
            timeout=30,
        )
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(stop)
        process.wait(timeout=30)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{sim_port}/health", timeout=2)
