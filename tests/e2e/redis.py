"""A real Redis server for the shared-state tests: ``PREFIXGATE_REDIS_SERVER``, else ``redis-server`` on PATH.

``make redis-server`` installs it (Debian's package) and ``make test`` passes its path. Without either the tests
are skipped with that instruction; a ``PREFIXGATE_REDIS_SERVER`` that names no executable is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.servers import free_port

__all__ = ["redis_url"]

ENV_VAR = "PREFIXGATE_REDIS_SERVER"


def _binary() -> str:
    configured = os.environ.get(ENV_VAR)
    if configured:
        if not (Path(configured).is_file() and os.access(configured, os.X_OK)):
            pytest.fail(f"{ENV_VAR}={configured} is not an executable file")
        return configured
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip(f"no redis-server: run `make redis-server` or set {ENV_VAR}")
    return found


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty Redis server on a free loopback port (no persistence), stopped afterwards."""
    port = free_port()
    command = [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
