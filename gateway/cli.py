"""The ``prefixgate`` command: ``serve`` (the gateway) and ``sim-engine`` (the built-in simulated engine)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import httpx
import msgspec

from gateway import __version__
from gateway.settings import Settings, SettingsError, add_arguments, load_settings

__all__ = ["main", "tune_runtime"]

logger = logging.getLogger("prefixgate.cli")

SIM_TOKEN_ENV = "PREFIXGATE_ADMIN_TOKEN"  # noqa: S105 (what engines.sim reads its --evict-token from)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixgate", description="OpenAI-compatible prefix-cache-aware gateway")
    parser.add_argument("--version", action="version", version=f"prefixgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Every option can also be set as PREFIXGATE_<OPTION> in the environment.",
    )
    add_arguments(serve)
    sim = commands.add_parser("sim-engine", help="run the built-in simulated engine", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)
    hook = commands.add_parser("install-hook", help="install the engine eviction hook (.pth)", add_help=False)
    hook.add_argument("hook_args", nargs=argparse.REMAINDER)
    batch = commands.add_parser(
        "reorder", help="send a large batch to a gateway's /reorder, with progress", add_help=False
    )
    batch.add_argument("reorder_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["sim-engine"]:
        from engines.sim import main as sim_main

        return sim_main(args_list[1:])
    if args_list[:1] == ["install-hook"]:
        from engines.hooks.install import main as hook_main

        return hook_main(args_list[1:])
    if args_list[:1] == ["reorder"]:
        from gateway.client.batch import main as reorder_main

        return reorder_main(args_list[1:])
    args = _parser().parse_args(args_list)
    try:
        settings = load_settings(vars(args))
    except SettingsError as exc:
        print(f"prefixgate: error: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: Settings) -> int:
    """Run the gateway (and, without ``--upstream``, the embedded simulated engine) until interrupted."""
    import uvicorn

    from gateway.app import create_app
    from gateway.edge.server import edge_protocol
    from gateway.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    # uvicorn re-raises SIGTERM once it has shut down; exiting through Python (not the default handler)
    # runs the clean-up below, so the embedded engine stops with the gateway.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with _embedded_sim(settings) as effective:
        logger.info("prefixgate %s starting with %s", __version__, effective.redacted())
        app = create_app(effective)
        tune_runtime()
        uvicorn.run(
            app,
            host=effective.host,
            port=effective.port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
            http=edge_protocol(settings),
            timeout_keep_alive=settings.http_keepalive_timeout,
        )
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def tune_runtime() -> None:
    """Keep the event loop responsive while a worker thread plans a big ``/reorder`` batch or a big prompt.

    - GIL hand-off: a CPU-bound worker holds the GIL for the whole switch interval (5 ms by default), and one
      request needs several hand-offs; 1 ms keeps a concurrent ``/health`` or proxied request quick.
    - Cyclic GC: a collection scans every tracked object, and a big batch or a large live index has hundreds of
      thousands; the index is acyclic and freed by reference counting, so collecting less often loses nothing.
      Objects alive at start-up (modules, the app) are frozen out of the scans altogether.
    """
    sys.setswitchinterval(0.001)
    gc.freeze()
    gc.set_threshold(10_000, 10, 100)


def _bind_sim_socket(settings: Settings) -> tuple[socket.socket, Settings]:
    """Bind the embedded engine's port here, so that a busy port is seen at once and never someone else's engine.

    Another process on ``sim_port`` (typically a second ``prefixgate serve``'s engine) would otherwise answer the
    health check and receive this gateway's traffic. Then a free port is used instead, and the settings say so.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", settings.sim_port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            sock.close()
            raise
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        logger.warning(
            "port %d is in use (another prefixgate's engine?); the embedded simulated engine listens on %d instead",
            settings.sim_port,
            port,
        )
        settings = msgspec.structs.replace(settings, sim_port=port)
    sock.listen(128)
    return sock, settings


@contextlib.contextmanager
def _embedded_sim(settings: Settings) -> Iterator[Settings]:
    """Start the simulated engine as a child process when no upstream was configured; yields the settings to use."""
    if not settings.embedded_sim:
        yield settings
        return
    sock, settings = _bind_sim_socket(settings)
    command = [
        sys.executable,
        "-m",
        "engines.sim",
        "--fd",
        str(sock.fileno()),
        "--capacity-tokens",
        str(settings.sim_capacity_tokens),
        "--prefill-us",
        str(settings.sim_prefill_us),
        "--log-level",
        "warning",
    ]
    # The token goes through the environment: a command line is visible to every user in ps.
    env = {name: value for name, value in os.environ.items() if name != SIM_TOKEN_ENV}
    if not settings.stateless:
        command += ["--evict-url", f"http://127.0.0.1:{settings.port}/evict"]
        if settings.admin_token:
            env[SIM_TOKEN_ENV] = settings.admin_token
    with sock:
        process = subprocess.Popen(command, env=env, pass_fds=[sock.fileno()])
    try:
        _wait_healthy(f"{settings.upstream_url}/health", process)
        logger.info("embedded simulated engine ready at %s", settings.upstream_url)
        yield settings
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"prefixgate: the simulated engine exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit("prefixgate: the simulated engine did not become healthy in time")


if __name__ == "__main__":
    raise SystemExit(main())
