"""Test support for a real `llama-server`: find the binary, write the tiny model, run servers, fixtures.

Fixtures (import them into a test module or `conftest.py`):

- `llama_binary` (session): path of the binary from `PREFIXGATE_LLAMA_SERVER`, else the cached build
  of `make llama-server`. Skips only when the variable is unset and nothing is cached; a variable that
  names no executable is a failure, not a skip.
- `tiny_model` (session): the tiny random-weight GGUF, written once into a pytest temp dir.
- `llama_server`: a fresh server (2 slots, ctx 8192, default RAM cache) for one test.
- `start_llama_server`: a factory `start(slots=..., ctx=..., cache_ram=..., extra_args=...)` for tests
  that need other settings; every server it starts is stopped when the test ends.

Each server logs to a file in the test's temp dir (`LlamaServer.log_path`); a server that fails to
start raises with the tail of that log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.builds.llamacpp import ENV_VAR, find_llama_server
from tests.builds.tinymodel import write_tiny_model
from tests.e2e.servers import EngineServer, free_port, stop_process, wait_engines_healthy

__all__ = [
    "LlamaServer",
    "LlamaServerError",
    "StartLlamaServer",
    "free_port",
    "llama_binary",
    "llama_server",
    "locate_llama_server",
    "run_llama_server",
    "start_llama_server",
    "tiny_model",
]

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class LlamaServerError(RuntimeError):
    """The server exited or never became healthy; the message carries the tail of its log."""


@dataclass(frozen=True)
class LlamaServer(EngineServer):
    """A running server: `url` is the origin (`http://127.0.0.1:PORT`), the OpenAI API is under `/v1`."""

    url: str
    port: int
    slots: int
    ctx: int
    args: tuple[str, ...]
    log_path: Path
    process: subprocess.Popen[bytes]

    def tail(self, lines: int = 40) -> str:
        return f"command: {' '.join(self.args)}\n" + super().tail(lines)


StartLlamaServer = Callable[..., LlamaServer]


def locate_llama_server() -> Path | None:
    """`PREFIXGATE_LLAMA_SERVER` if set (even if it is wrong: the caller reports it), else the cached build."""
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    return find_llama_server()


@contextlib.contextmanager
def run_llama_server(
    binary: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    slots: int = 2,
    ctx: int = 8192,
    cache_ram: int | None = None,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike[str] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[LlamaServer]:
    """Start `llama-server` on a free loopback port, wait for `/health`, stop it (kill if stuck) on exit.

    `cache_ram` is `--cache-ram` in MiB (0 disables the host-RAM prompt cache, so an evicted slot's
    prefix is really gone). The `/slots` endpoint and `/metrics` are enabled.
    """
    port = free_port()
    args = [
        *("--model", str(model), "--host", "127.0.0.1", "--port", str(port)),
        *("--ctx-size", str(ctx), "--parallel", str(slots), "--threads", "2"),
        *("--offline", "--no-webui", "--metrics", "--slots"),
        *(("--cache-ram", str(cache_ram)) if cache_ram is not None else ()),
        *extra_args,
    ]
    log_file = Path(log_path) if log_path is not None else Path(tempfile.gettempdir()) / f"llama-server-{port}.log"
    with log_file.open("wb") as log_handle:
        process = subprocess.Popen(
            [str(binary), *args], stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT
        )
    server = LlamaServer(
        url=f"http://127.0.0.1:{port}",
        port=port,
        slots=slots,
        ctx=ctx,
        args=tuple(args),
        log_path=log_file,
        process=process,
    )
    try:
        _wait_healthy(server, startup_timeout)
        yield server
    finally:
        _stop(process)


def _wait_healthy(server: LlamaServer, timeout: float) -> None:
    wait_engines_healthy([server], timeout, name="llama-server", error=LlamaServerError, interval=0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    binary = locate_llama_server()
    if binary is None:
        pytest.skip(f"no llama-server: run `make llama-server` or set {ENV_VAR} to a llama-server binary")
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{ENV_VAR}={binary} is not an executable file")
    return binary


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("llama-model") / "tiny.gguf")


@pytest.fixture
def start_llama_server(llama_binary: Path, tiny_model: Path, tmp_path: Path) -> Iterator[StartLlamaServer]:
    with contextlib.ExitStack() as stack:
        count = 0

        def start(
            *,
            slots: int = 2,
            ctx: int = 8192,
            cache_ram: int | None = None,
            extra_args: Sequence[str] = (),
        ) -> LlamaServer:
            nonlocal count
            count += 1
            return stack.enter_context(
                run_llama_server(
                    llama_binary,
                    tiny_model,
                    slots=slots,
                    ctx=ctx,
                    cache_ram=cache_ram,
                    extra_args=extra_args,
                    log_path=tmp_path / f"llama-server-{count}.log",
                )
            )

        yield start


@pytest.fixture
def llama_server(start_llama_server: StartLlamaServer) -> LlamaServer:
    return start_llama_server()
