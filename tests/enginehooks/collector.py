"""A stand-in for the gateway's ``POST /evict``: a real local HTTP/1.1 server that records what the hook sends.

Stdlib only, so the main test suite and the engines venv both use it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Collector", "Received", "collector"]


@dataclass
class Received:
    path: str
    authorization: str | None
    request_ids: list[str]
    client_port: int


@dataclass
class Collector:
    """What the server saw; ``statuses`` are answered first, in order, then 200."""

    url: str
    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ids(self) -> list[str]:
        with self.lock:
            return [rid for r in self.received for rid in r.request_ids]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.ids) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ids


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's server does
    timeout = 10
    server: Any

    def do_POST(self) -> None:
        state: Collector = self.server.collector
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with state.lock:
            state.attempts += 1
            status = state.statuses.pop(0) if state.statuses else 200
        if state.delay_s:
            time.sleep(state.delay_s)
        if status == 200:
            ids = json.loads(body)["request_ids"]
            with state.lock:
                state.received.append(
                    Received(self.path, self.headers.get("Authorization"), ids, self.client_address[1])
                )
        payload = b'{"evicted": 0}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@contextmanager
def collector(path_prefix: str = "", *, port: int = 0, idle_timeout: float = 10.0) -> Iterator[Collector]:
    """Serve on 127.0.0.1 in a thread; ``idle_timeout`` closes kept-alive connections that stay idle that long."""
    handler = type("Handler", (_Handler,), {"timeout": idle_timeout})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    state = Collector(url=f"http://127.0.0.1:{server.server_address[1]}{path_prefix}")
    server.collector = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
