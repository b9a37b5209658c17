"""``prefixgate serve`` as users run it: the embedded simulated engine starts and stops with the gateway."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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


@contextlib.contextmanager
def _decoy_engine() -> Iterator[tuple[int, list[str]]]:
    """Something else already listening where the embedded engine would go, healthy to anyone who asks."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_a_busy_engine_port_and_the_admin_token_stay_out_of_reach() -> None:
    """A second gateway does not attach to whatever holds its engine port, and no command line shows the token."""
    port, token = free_port(), "s3cret-token-for-ps"
    with _decoy_engine() as (busy_port, decoy_seen):
        command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--sim-port", str(busy_port)]
        command += ["--sim-capacity-tokens", "256", "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXGATE_")}
        env["PREFIXGATE_ADMIN_TOKEN"] = token  # how a deployment keeps it out of ps; the engine must too
        process = subprocess.Popen(command, env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health")
            upstream = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["upstream"]
            assert upstream != f"http://127.0.0.1:{busy_port}"
            for i in range(6):  # distinct prompts overflow the small cache: the engine reports evictions
                prompt = " ".join(f"w{i}x{j}" for j in range(60))
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": "sim", "prompt": prompt, "max_tokens": 2},
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["usage"]["completion_tokens"] == 2
            assert not [path for path in decoy_seen if path.startswith("/v1")]
            # the engine is this gateway's child, its token came through the environment, and /evict accepted it
            children = [pid for pid in _descendants(process.pid) if Path(f"/proc/{pid}/cmdline").exists()]
            assert children
            for pid in (process.pid, *children):
                assert token not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            deadline = time.monotonic() + 10
            while (evictions := httpx.get(f"{upstream}/sim/stats", timeout=5).json()["evictions"])["sent"] == 0:
                assert time.monotonic() < deadline, evictions
                time.sleep(0.05)
            assert evictions["rejected"] == 0 and evictions["failed_posts"] == 0, evictions
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
