"""Command line of the simulated engine (``prefixgate sim-engine`` / ``python -m engines.sim``) and its server."""

from __future__ import annotations

import argparse
import logging
import os
import socket

import httpx
import uvicorn

from engines.sim.app import create_sim_app
from engines.sim.config import SimConfig

__all__ = ["TOKEN_ENV", "build_parser", "build_server", "main"]

logger = logging.getLogger(__name__)

TOKEN_ENV = "PREFIXGATE_ADMIN_TOKEN"  # noqa: S105 (the variable's name, not a secret)


def build_parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="prefixgate sim-engine",
        description="Simulated OpenAI-compatible LLM engine with a token-level radix prefix cache.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    add("--port", type=int, default=8766, help="bind port (default: %(default)s)")
    add("--fd", type=int, default=None, help="serve on this already bound, inherited socket instead of --host/--port")
    add("--model", default=defaults.model, help="served model name (default: %(default)s)")
    add("--capacity-tokens", type=int, default=defaults.capacity_tokens, help="KV cache size in tokens")
    add("--prefill-us", type=float, default=defaults.prefill_us_per_token, help="prefill cost per uncached token (µs)")
    add("--decode-us", type=float, default=defaults.decode_us_per_token, help="decode delay per output token (µs)")
    add("--parallel-prefill", action="store_true", help="let concurrent prefills overlap instead of queueing")
    add("--no-cache-output", action="store_true", help="cache only prompts, not prompt + generated tokens")
    add("--record-requests", type=int, default=defaults.record_requests, help="requests kept for GET /sim/requests")
    add("--evict-url", default=None, help='POST {"request_ids": [...]} here when cached requests are evicted')
    add(
        "--evict-token",
        default=None,
        help=f"bearer token for --evict-url (default: ${TOKEN_ENV}; prefer the variable, a flag shows in ps)",
    )
    add("--evict-flush-ms", type=float, default=defaults.evict_flush_ms, help="coalescing window for eviction POSTs")
    add("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SimConfig:
    if args.capacity_tokens < 1:
        parser.error("--capacity-tokens must be positive")
    if args.prefill_us < 0 or args.decode_us < 0:
        parser.error("--prefill-us and --decode-us must not be negative")
    if args.evict_url is not None:
        try:
            scheme = httpx.URL(args.evict_url).scheme
        except httpx.InvalidURL as exc:
            parser.error(f"--evict-url: {exc}")
        if scheme not in ("http", "https"):
            parser.error("--evict-url must be an http(s) URL")
    return SimConfig(
        model=args.model,
        capacity_tokens=args.capacity_tokens,
        prefill_us_per_token=args.prefill_us,
        decode_us_per_token=args.decode_us,
        serial_prefill=not args.parallel_prefill,
        cache_output=not args.no_cache_output,
        record_requests=args.record_requests,
        evict_url=args.evict_url,
        evict_token=args.evict_token or os.environ.get(TOKEN_ENV) or None,
        evict_flush_ms=args.evict_flush_ms,
    )


def build_server(
    config: SimConfig, host: str = "127.0.0.1", port: int = 8766, log_level: str = "info"
) -> uvicorn.Server:
    """A uvicorn server for a fresh simulated engine (``server.run()``, or ``server.run(sockets=[...])``)."""
    uv_config = uvicorn.Config(
        create_sim_app(config),
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,  # logging is the caller's (main() configures the root logger); uvicorn's loggers propagate
        lifespan="on",
        ws="none",
        access_log=False,
        server_header=False,
        date_header=False,
    )
    return uvicorn.Server(uv_config)


def main(argv: list[str] | None = None) -> int:
    """Run the simulated engine until interrupted; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = _config(args, parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sock = None if args.fd is None else socket.socket(fileno=args.fd)
    host, port = (args.host, args.port) if sock is None else sock.getsockname()[:2]
    logger.info(
        "simulated engine on http://%s:%d model=%s capacity_tokens=%d prefill_us=%g decode_us=%g evict_url=%s%s",
        host,
        port,
        config.model,
        config.capacity_tokens,
        config.prefill_us_per_token,
        config.decode_us_per_token,
        config.evict_url,
        " (with token)" if config.evict_token else "",
    )
    server = build_server(config, args.host, args.port, args.log_level)
    server.run(sockets=None if sock is None else [sock])
    return 0
