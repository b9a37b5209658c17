"""Real loopback servers for end-to-end tests: uvicorn in a background thread, on a free port."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import uvicorn

__all__ = ["CHAT_ANSWER", "free_port", "gateway_process", "serve_in_thread", "wait_for", "wait_healthy"]


# One whole chat completion: what the ASGI and socket test upstreams answer a chat request with.
CHAT_ANSWER = json.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()


async def receive_body(receive: Any) -> bytes:
    """The whole body of a request an ASGI test upstream is answering."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def stop_process(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """Terminate a server process, kill it if it outlives ``grace`` seconds, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


class EngineServer:
    """What a running engine server for the tests (llama-server, vLLM) offers besides its own dataclass fields:
    ``url`` is the origin (``http://127.0.0.1:PORT``), the OpenAI API is under ``/v1``."""

    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` of the log, for the message of a server that failed to start."""
        text = self.log().splitlines()[-lines:]
        return f"log {self.log_path} (last {len(text)} lines):\n" + "\n".join(text)


def wait_engines_healthy(
    servers: Sequence[EngineServer], timeout: float, *, name: str, error: type[Exception], interval: float
) -> None:
    """Poll each server's ``/health`` until all answer 200; raise ``error`` with the log tail of one that exits
    or of the first still waiting after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    with httpx.Client(timeout=2.0) as client:
        while waiting:
            for server in list(waiting):
                code = server.process.poll()
                if code is not None:
                    raise error(f"{name} exited with status {code} during startup\n{server.tail()}")
                try:
                    if client.get(f"{server.url}/health").status_code == 200:
                        waiting.remove(server)
                except httpx.TransportError:
                    pass  # not listening yet
            if waiting and time.monotonic() > deadline:
                raise error(f"{name} was not healthy after {timeout:.0f}s\n{waiting[0].tail()}")
            if waiting:
                time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_healthy(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{url} did not become healthy")


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition", *, fail: bool = True) -> bool:
    """Poll ``check`` until it holds; when it does not within ``timeout`` seconds, fail the test (``fail``) or
    return False."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            assert not fail, f"timed out waiting for {what}"
            return False
        time.sleep(0.02)
    return True


@contextmanager
def serve_in_thread(app: Any, port: int | None = None, health: str = "/health") -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in a daemon thread; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base + health)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def gateway_process(*args: str, stderr: IO[bytes] | None = None, timeout: float = 30.0) -> Iterator[str]:
    """``prefixgate serve`` as users run it (``python -m gateway.cli serve ARGS``) on a free port; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"prefixgate serve exited with {process.returncode}"
            assert time.monotonic() < deadline, "prefixgate serve did not become healthy"
            try:
                if httpx.get(base + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
