"""The one frozen ``Settings`` object: defaults < ``PREFIXGATE_*`` environment < command-line options.

This module is the only reader of ``os.environ`` in the gateway. Every option has one name used three
ways: the struct field ``read_timeout``, the flag ``--read-timeout`` and the variable
``PREFIXGATE_READ_TIMEOUT``. Invalid values fail at start with a message naming the option.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from gateway.errors import split_error_path

__all__ = ["ENV_PREFIX", "OPTIONS", "Settings", "SettingsError", "add_arguments", "load_settings"]

ENV_PREFIX = "PREFIXGATE_"

Engine = Literal["sglang", "vllm", "llamacpp", "openai"]
ENGINE_KINDS = ("sglang", "vllm", "llamacpp", "openai")
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
ReorderScope = Literal["all", "system", "user", "tool", "completions"]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the gateway is configured with. Build it with ``load_settings``."""

    host: str = "127.0.0.1"
    port: int = 8765
    upstream: tuple[str, ...] = ()
    engine: Engine = "openai"
    stateless: bool = False
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    api_key: tuple[str, ...] = ()
    admin_token: str = ""
    upstream_api_key: str = ""
    max_body_bytes: int = 16 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    write_timeout: float = 60.0
    pool_timeout: float = 30.0
    max_connections: int = 512
    max_keepalive: int = 128
    reorder: bool = True
    reorder_scope: ReorderScope = "all"
    relevance_annotation: bool = False
    citation_mapping: bool = False
    access_log: bool = False
    index_max_requests: int = 200_000
    reorder_max_contexts: int = 200_000
    reorder_max_blocks: int = 4_096
    kv_events_endpoint: tuple[str, ...] = ()
    kv_events_replay: tuple[str, ...] = ()
    kv_events_topic: str = ""
    sim_port: int = 8766
    sim_capacity_tokens: int = 262_144
    sim_prefill_us: float = 20.0
    max_blocks_per_request: int = 4_096
    max_concurrent_streams: int = 1_024
    intercept_budget_ms: float = 50.0
    memo_mib: int = 16
    shared_cache: bool = False
    schedule_max_contexts: int = 10_000
    batch_search: int = 0
    http_max_header_bytes: int = 65_536
    http_max_headers: int = 100
    http_header_timeout: float = 10.0
    http_body_timeout: float = 60.0
    http_keepalive_timeout: int = 5
    http_max_requests_per_connection: int = 1_000
    health_interval: float = 2.0
    eject_after: int = 3
    balance_abs: int = 4
    balance_rel: float = 1.5
    state: str = ""
    state_max_len: int = 100_000

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port: must be between 0 and 65535")
        if not 1 <= self.sim_port <= 65535:
            raise ValueError("sim_port: must be between 1 and 65535")
        for entry in self.upstream:
            kind, url = _split_upstream(entry)
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("upstream: must be an http:// or https:// URL, optionally KIND=URL")
            if kind and kind not in ENGINE_KINDS:
                raise ValueError(f"upstream: unknown engine kind {kind!r} (one of {', '.join(ENGINE_KINDS)})")
        if (
            len(self.kv_events_endpoint) > 1
            and len(self.upstream) > 1
            and len(self.kv_events_endpoint) != len(self.upstream)
        ):
            raise ValueError("kv_events_endpoint: with several upstreams, give one endpoint per --upstream")
        if not self.health_interval > 0:
            raise ValueError("health_interval: must be a positive number of seconds")
        if self.eject_after < 1 or self.balance_abs < 0 or self.balance_rel < 1:
            raise ValueError("eject_after: at least 1; balance_abs: at least 0; balance_rel: at least 1")
        if self.state and urlsplit(self.state).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("state: expected redis://host:port[/db] (or rediss://, unix://)")
        if self.state_max_len < 100:
            raise ValueError("state_max_len: must be at least 100")
        if self.batch_search < 0:
            raise ValueError("batch_search: must be at least 0")
        for name in ("max_body_bytes", "max_connections", "max_keepalive", "index_max_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        for name in ("reorder_max_contexts", "reorder_max_blocks", "sim_capacity_tokens", "memo_mib"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        for name in (
            "connect_timeout",
            "read_timeout",
            "write_timeout",
            "pool_timeout",
            "intercept_budget_ms",
            "http_header_timeout",
            "http_body_timeout",
            "http_keepalive_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be a positive number")
        if self.sim_prefill_us < 0:
            raise ValueError("sim_prefill_us: must not be negative")
        if len(self.kv_events_replay) > len(self.kv_events_endpoint):
            raise ValueError("kv_events_replay: one replay endpoint per --kv-events-endpoint at most")
        for endpoint in (*self.kv_events_endpoint, *self.kv_events_replay):
            if not re.fullmatch(r"(tcp|ipc|inproc)://\S+", endpoint.removeprefix("bind:")):
                raise ValueError("kv_events_endpoint: expected tcp://host:port (or ipc://, inproc://)")
        if any(endpoint.startswith("bind:") for endpoint in self.kv_events_replay):
            raise ValueError("kv_events_replay: the engine binds its replay socket; connect to it (no bind:)")
        for key in self.api_key:
            if not key or any(ch.isspace() for ch in key):
                raise ValueError("api_key: keys must be non-empty and contain no whitespace")
        for name in (
            "max_blocks_per_request",
            "max_concurrent_streams",
            "schedule_max_contexts",
            "http_max_header_bytes",
            "http_max_headers",
            "http_max_requests_per_connection",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        # Secrets travel in HTTP headers: only visible ASCII survives every client and server unchanged.
        for name in ("api_key", "admin_token", "upstream_api_key"):
            values = getattr(self, name)
            for value in values if isinstance(values, tuple) else (values,):
                if not all("!" <= ch <= "~" for ch in value):
                    raise ValueError(f"{name}: must be visible ASCII characters (no spaces or control characters)")

    @property
    def upstreams(self) -> list[tuple[str, str]]:
        """Every engine replica as ``(engine kind, base URL without trailing slash)``, in the order given; the
        embedded simulated engine when none was given. ``KIND=URL`` overrides ``--engine`` for one replica."""
        if not self.upstream:
            return [(self.engine, f"http://127.0.0.1:{self.sim_port}")]
        out = []
        for entry in self.upstream:
            kind, url = _split_upstream(entry)
            out.append((kind or self.engine, url.rstrip("/")))
        return out

    @property
    def upstream_url(self) -> str:
        """The first upstream base URL (the embedded simulated engine when none was given), without trailing slash."""
        return self.upstreams[0][1]

    @property
    def embedded_sim(self) -> bool:
        return not self.upstream

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for the start-up log line, secrets masked."""
        out = msgspec.structs.asdict(self)
        for secret in ("admin_token", "upstream_api_key"):
            out[secret] = "***" if out[secret] else ""
        out["api_key"] = [f"***({len(k)})" for k in self.api_key]
        return out


def _split_upstream(entry: str) -> tuple[str, str]:
    """``KIND=URL`` -> (kind, url); a bare URL -> ("", url) (an ``=`` inside the URL is not a kind)."""
    head, sep, rest = entry.partition("=")
    if sep and "://" not in head:
        return head.strip(), rest.strip()
    return "", entry.strip()


class SettingsError(ValueError):
    """An option had an invalid value; the message names the option and its variable."""


# field -> (help, flag kind); kind "flag" is a store_true switch, "multi" may repeat.
OPTIONS: dict[str, tuple[str, str]] = {
    "host": ("address to bind (default 127.0.0.1: loopback only)", "value"),
    "port": ("port to listen on", "value"),
    "upstream": (
        "base URL of an engine replica, repeatable (env: comma-separated); KIND=URL sets its engine kind; "
        "empty starts the built-in simulated engine",
        "multi",
    ),
    "engine": ("engine kind behind --upstream: sglang, vllm, llamacpp or openai (generic)", "value"),
    "stateless": ("keep no live index: /reorder is one-shot, /evict removes nothing", "flag"),
    "log_level": ("debug, info, warning or error", "value"),
    "log_format": ("text or json", "value"),
    "api_key": (
        "key clients must send on proxy routes, as Authorization: Bearer or x-api-key "
        "(repeatable; env: comma-separated)",
        "multi",
    ),
    "admin_token": (
        "bearer token required on /evict, /reset, /deduplicate, /insert, /update and stateful /reorder and /build",
        "value",
    ),
    "upstream_api_key": ("bearer key the gateway sends to the upstream engine", "value"),
    "max_body_bytes": ("largest accepted request body in bytes (413 above)", "value"),
    "connect_timeout": ("seconds to connect to the upstream", "value"),
    "read_timeout": ("seconds the upstream may stay silent (LLM streams are long)", "value"),
    "write_timeout": ("seconds to send a request body upstream", "value"),
    "pool_timeout": ("seconds to wait for a free upstream connection", "value"),
    "max_connections": ("most concurrent upstream connections", "value"),
    "max_keepalive": ("most idle upstream connections kept open", "value"),
    "reorder": ("reorder retrieved blocks in proxied requests (--no-reorder to turn off)", "bool"),
    "reorder_scope": ("where to look for blocks: all, system, user, tool or completions", "value"),
    "relevance_annotation": ("after a reordered group, restate the retriever's original order", "flag"),
    "citation_mapping": (
        "renumber groups the prompt asks to cite by number, and map the answer's [n] back (docs/citation-mapping.md)",
        "flag",
    ),
    "access_log": ("log one line per proxied request: id, route, status, groups, cached tokens, latency", "flag"),
    "index_max_requests": ("live index cap in requests (least recently used dropped first)", "value"),
    "reorder_max_contexts": ("most contexts accepted by one /reorder", "value"),
    "reorder_max_blocks": ("most blocks accepted per context", "value"),
    "kv_events_endpoint": (
        "ZMQ KV-event publisher of the engine, one per DP rank (repeatable); bind:tcp://... binds it instead",
        "multi",
    ),
    "kv_events_replay": ("its replay endpoint, in the same order (repeatable)", "multi"),
    "kv_events_topic": ("KV-event topic the engine publishes on", "value"),
    "sim_port": ("port of the embedded simulated engine (when --upstream is empty)", "value"),
    "sim_capacity_tokens": ("KV capacity of the embedded simulated engine in tokens", "value"),
    "sim_prefill_us": ("simulated prefill cost per uncached prompt token, microseconds", "value"),
    "max_blocks_per_request": ("most retrieved blocks one proxied request may carry (413 above)", "value"),
    "max_concurrent_streams": ("most streaming requests in flight at once (429 with Retry-After above)", "value"),
    "intercept_budget_ms": (
        "CPU time per request for finding and planning blocks; past it, forwarded unchanged",
        "value",
    ),
    "memo_mib": (
        "memory for remembered rewrites, in MiB: a text seen again is sent exactly as it was sent before",
        "value",
    ),
    "shared_cache": ("with --api-key: share the planner memo and index view across keys (off: one per key)", "flag"),
    "batch_search": (
        "extra search on a /reorder batch: blocks re-placed per block of the batch (0: off; more: more shared "
        "prefix, ~10 us each)",
        "value",
    ),
    "schedule_max_contexts": (
        "most contexts accepted by one stateless /schedule (or /reorder with --stateless)",
        "value",
    ),
    "http_max_header_bytes": ("largest request line plus headers in bytes (431 above)", "value"),
    "http_max_headers": ("most header fields in one request (431 above)", "value"),
    "http_header_timeout": ("seconds a client has to send the request line and headers (408 after)", "value"),
    "http_body_timeout": ("seconds a client has to send the whole body after its headers (closed after)", "value"),
    "http_keepalive_timeout": ("seconds an idle keep-alive connection stays open", "value"),
    "http_max_requests_per_connection": ("requests served on one keep-alive connection before it is closed", "value"),
    "health_interval": ("seconds between active health checks of each replica (with several upstreams)", "value"),
    "eject_after": ("consecutive failures (checks or connects) that take a replica out of routing", "value"),
    "balance_abs": ("balance guard: in-flight spread above which the least loaded replica wins...", "value"),
    "balance_rel": ("...when the busiest replica also has this many times the idlest's in-flight requests", "value"),
    "state": ("redis://host:port/db shares index changes with other gateways (empty: in process only)", "value"),
    "state_max_len": ("index changes kept in the shared Redis stream (XADD MAXLEN ~)", "value"),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting; unset flags stay absent so env and defaults apply."""
    for name, (help_text, kind) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind == "flag":
            parser.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif kind == "bool":
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif kind == "multi":
            parser.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (_, kind) in OPTIONS.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if kind in ("flag", "bool"):
            lowered = raw.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise SettingsError(f"{_describe(name)}: expected a boolean (1/0, true/false), got {raw!r}")
            values[name] = lowered in _TRUE
        elif kind == "multi":
            values[name] = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            values[name] = raw
    return values


def _describe(name: str) -> str:
    return f"--{name.replace('_', '-')} ({ENV_PREFIX}{name.upper()})"


def load_settings(
    cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Merge defaults, environment, CLI values (an ``argparse`` namespace's dict) and explicit overrides."""
    merged = _env_values(os.environ if environ is None else environ)
    merged.update({k: v for k, v in (cli or {}).items() if k in OPTIONS})
    merged.update(overrides)
    for name, (_, kind) in OPTIONS.items():
        if kind == "multi" and isinstance(merged.get(name), str):
            merged[name] = [merged[name]]
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        detail, path = split_error_path(str(exc))
        # a wrong type names the field in its path; a check in ``Settings.__post_init__`` leads with "field: "
        field = re.split(r"\W", path or detail.partition(": ")[0], maxsplit=1)[0]
        if field in OPTIONS:
            detail = detail.removeprefix(f"{field}: ").strip()
            raise SettingsError(f"invalid value for {_describe(field)}: {detail}") from None
        raise SettingsError(f"invalid settings: {exc}") from None
