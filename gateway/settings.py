"""The one frozen ``Settings`` object: defaults < ``PREFIXGATE_*`` environment < command-line options.

This module is the only reader of ``os.environ`` in the gateway. Every option is declared once, as a field of
``Settings`` with its default, its type, its constraints and its help (``option``: a msgspec ``Meta`` that also
names the option's group); the command line (``add_arguments``, one argument group per feature), the environment
names and docs/configuration.md (``tests/unit/test_config_docs.py``) are derived from those declarations. Every
option has one name used three ways: the struct field ``read_timeout``, the flag ``--read-timeout`` and the
variable ``PREFIXGATE_READ_TIMEOUT``; the names stay flat because they are the product's public interface.
Invalid values fail at start with a message naming the option; checks across options are in ``__post_init__``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NamedTuple, get_type_hints
from urllib.parse import urlsplit

import msgspec

from gateway.errors import split_error_path

__all__ = [
    "ENV_PREFIX",
    "OPTIONS",
    "SIM_UPSTREAM",
    "Option",
    "Settings",
    "SettingsError",
    "add_arguments",
    "TOKENIZER_AUTO",
    "load_settings",
    "local_tokenizer",
    "tokenizer_file",
]

ENV_PREFIX = "PREFIXGATE_"

Engine = Literal["sglang", "vllm", "llamacpp", "openai"]
ENGINE_KINDS = ("sglang", "vllm", "llamacpp", "openai")
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
ReorderScope = Literal["all", "system", "user", "tool", "completions"]
TOKENIZER_AUTO = "auto"  # --tokenizer auto: the model's own, found through the engine (``local_tokenizer``)
SIM_UPSTREAM = "sim://"  # the built-in simulated engine, started by ``prefixgate serve`` itself


def option(group: str, help_text: str, **constraints: Any) -> msgspec.Meta:
    """One option's declaration: its group (the ``--help`` section and the docs heading), help and constraints."""
    return msgspec.Meta(description=help_text, extra={"group": group}, **constraints)


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the gateway is configured with. Build it with ``load_settings``."""

    # server
    host: Annotated[str, option("server", "address to bind (default 127.0.0.1: loopback only)")] = "127.0.0.1"
    port: Annotated[int, option("server", "port to listen on", ge=0, le=65535)] = 8765
    log_level: Annotated[LogLevel, option("server", "debug, info, warning or error")] = "info"
    log_format: Annotated[LogFormat, option("server", "text or json")] = "text"
    access_log: Annotated[
        bool, option("server", "log one line per proxied request: id, route, status, groups, cached tokens, latency")
    ] = False
    decision_log: Annotated[
        int,
        option(
            "server",
            "keep what was done to the last N proxied requests for GET /debug/requests (admin token; 0: off)",
            ge=0,
            le=10_000,
        ),
    ] = 0
    decision_log_text: Annotated[
        bool, option("server", "with --decision-log: keep the sent and forwarded bodies too (capped)")
    ] = False
    # upstream
    upstream: Annotated[
        tuple[str, ...],
        option(
            "upstream",
            "base URL of an engine replica, repeatable (env: comma-separated); KIND=URL sets its engine kind; "
            "sim:// (the default) starts the built-in simulated engine",
        ),
    ] = (SIM_UPSTREAM,)
    engine: Annotated[
        Engine, option("upstream", "engine kind behind --upstream: sglang, vllm, llamacpp or openai (generic)")
    ] = "openai"
    llamacpp_prompt_cache: Annotated[
        bool,
        option(
            "upstream",
            "llama-server keeps a host-RAM prompt cache (its default --cache-ram): requests are left to its own "
            "slot choice, which saves and restores prompts; --no-llamacpp-prompt-cache for --cache-ram 0, where "
            "its slots are its whole cache and each request is pinned to the slot holding its prefix",
        ),
    ] = True
    upstream_api_key: Annotated[str, option("upstream", "bearer key the gateway sends to the upstream engine")] = ""
    connect_timeout: Annotated[float, option("upstream", "seconds to connect to the upstream", gt=0)] = 5.0
    read_timeout: Annotated[
        float, option("upstream", "seconds the upstream may stay silent (LLM streams are long)", gt=0)
    ] = 600.0
    write_timeout: Annotated[float, option("upstream", "seconds to send a request body upstream", gt=0)] = 60.0
    pool_timeout: Annotated[float, option("upstream", "seconds to wait for a free upstream connection", gt=0)] = 30.0
    max_connections: Annotated[int, option("upstream", "most concurrent upstream connections", ge=1)] = 512
    max_keepalive: Annotated[int, option("upstream", "most idle upstream connections kept open", ge=1)] = 128
    # replicas
    health_interval: Annotated[
        float, option("replicas", "seconds between active health checks of each replica (with several upstreams)", gt=0)
    ] = 2.0
    eject_after: Annotated[
        int,
        option(
            "replicas",
            "consecutive failures that take a replica out of routing: failed checks, or failed requests (timeouts, "
            "lost connections, 502/503/504, stuck requests)",
            ge=1,
        ),
    ] = 3
    eject_time: Annotated[
        float,
        option(
            "replicas",
            "seconds a replica ejected for failed requests stays out, times its ejection count (max 10x)",
            gt=0,
        ),
    ] = 30.0
    max_ejected_percent: Annotated[
        int,
        option(
            "replicas", "most replicas ejected for failed requests at once, in percent (at least one)", ge=0, le=100
        ),
    ] = 50
    stuck_factor: Annotated[
        float,
        option(
            "replicas",
            "route around a replica whose request waits this many times its peers' median answer time "
            "(min 1 s; 0: off)",
            ge=0,
        ),
    ] = 10.0
    balance_abs: Annotated[
        int, option("replicas", "balance guard: in-flight spread above which the least loaded replica wins...", ge=0)
    ] = 4
    balance_rel: Annotated[
        float,
        option(
            "replicas", "...when the busiest replica also has this many times the idlest's in-flight requests", ge=1
        ),
    ] = 1.5
    # security
    api_key: Annotated[
        tuple[str, ...],
        option(
            "security",
            "key clients must send on proxy routes, as Authorization: Bearer or x-api-key "
            "(repeatable; env: comma-separated)",
        ),
    ] = ()
    admin_token: Annotated[
        str,
        option(
            "security",
            "bearer token required on /evict, /reset, /deduplicate, /insert, /update and stateful /reorder and /build",
        ),
    ] = ""
    shared_cache: Annotated[
        bool, option("security", "with --api-key: share the planner memo and index view across keys (off: one per key)")
    ] = False
    namespace_secret: Annotated[
        str,
        option(
            "security",
            "secret (16+ characters) the key namespaces are derived from, the same on every gateway of a deployment; "
            "required with --api-key and --state",
        ),
    ] = ""
    # limits
    max_body_bytes: Annotated[int, option("limits", "largest accepted request body in bytes (413 above)", ge=1)] = (
        16 * 1024 * 1024
    )
    max_blocks_per_request: Annotated[
        int, option("limits", "most retrieved blocks one proxied request may carry (413 above)", ge=1)
    ] = 4_096
    max_concurrent_streams: Annotated[
        int, option("limits", "most streaming requests in flight at once (429 with Retry-After above)", ge=1)
    ] = 1_024
    http_max_header_bytes: Annotated[
        int, option("limits", "largest request line plus headers in bytes (431 above)", ge=1)
    ] = 65_536
    http_max_headers: Annotated[int, option("limits", "most header fields in one request (431 above)", ge=1)] = 100
    http_header_timeout: Annotated[
        float, option("limits", "seconds a client has to send the request line and headers (408 after)", gt=0)
    ] = 10.0
    http_body_timeout: Annotated[
        float, option("limits", "seconds a client has to send the whole body after its headers (closed after)", gt=0)
    ] = 60.0
    http_keepalive_timeout: Annotated[
        int, option("limits", "seconds an idle keep-alive connection stays open", gt=0)
    ] = 5
    http_max_requests_per_connection: Annotated[
        int, option("limits", "requests served on one keep-alive connection before it is closed", ge=1)
    ] = 1_000
    # planning
    reorder: Annotated[
        bool, option("planning", "reorder retrieved blocks in proxied requests (--no-reorder to turn off)")
    ] = True
    reorder_scope: Annotated[
        ReorderScope, option("planning", "where to look for blocks: all, system, user, tool or completions")
    ] = "all"
    relevance_annotation: Annotated[
        bool, option("planning", "after a reordered group, restate the retriever's original order")
    ] = False
    citation_mapping: Annotated[
        bool,
        option(
            "planning",
            "renumber groups the prompt asks to cite by number, and map the answer's [n] back (docs/meaning.md)",
        ),
    ] = False
    intercept_budget_ms: Annotated[
        float,
        option("planning", "CPU time per request for finding and planning blocks; past it, forwarded unchanged", gt=0),
    ] = 50.0
    tokenizer: Annotated[
        str,
        option(
            "planning",
            "the served model's tokenizer.json (or the model directory holding it), or 'auto': the one of the "
            "model the engine names, when it is on this host; predictions count the prompt's texts exactly "
            "('tokenizer' extra)",
        ),
    ] = ""
    memo_mib: Annotated[
        int,
        option(
            "planning",
            "memory for remembered rewrites, in MiB: a text seen again is sent exactly as it was sent before",
            ge=1,
        ),
    ] = 16
    # index
    stateless: Annotated[bool, option("index", "keep no live index: /reorder is one-shot, /evict removes nothing")] = (
        False
    )
    index_max_requests: Annotated[
        int, option("index", "live index cap in requests (least recently used dropped first)", ge=1)
    ] = 200_000
    reorder_max_contexts: Annotated[int, option("index", "most contexts accepted by one /reorder", ge=1)] = 200_000
    reorder_max_blocks: Annotated[int, option("index", "most blocks accepted per context", ge=1)] = 4_096
    schedule_max_contexts: Annotated[
        int, option("index", "most contexts accepted by one stateless /schedule (or /reorder with --stateless)", ge=1)
    ] = 10_000
    batch_search: Annotated[
        int,
        option(
            "index",
            "extra search on a /reorder batch: blocks re-placed per block of the batch (0: off; more: more shared "
            "prefix, ~10 us each)",
            ge=0,
        ),
    ] = 0
    # kv events
    kv_events_endpoint: Annotated[
        tuple[str, ...],
        option(
            "kv events",
            "ZMQ KV-event publisher of the engine, one per DP rank (repeatable); bind:tcp://... binds it instead",
        ),
    ] = ()
    kv_events_replay: Annotated[
        tuple[str, ...], option("kv events", "its replay endpoint, in the same order (repeatable)")
    ] = ()
    kv_events_topic: Annotated[str, option("kv events", "KV-event topic the engine publishes on")] = ""
    # state
    state: Annotated[
        str, option("state", "redis://host:port/db shares index changes with other gateways (empty: in process only)")
    ] = ""
    state_max_len: Annotated[
        int, option("state", "index changes kept in the shared Redis stream (XADD MAXLEN ~)", ge=100)
    ] = 100_000
    # simulated engine
    sim_port: Annotated[
        int,
        option("simulated engine", "port of the embedded simulated engine (with --upstream sim://)", ge=1, le=65535),
    ] = 8766
    sim_capacity_tokens: Annotated[
        int, option("simulated engine", "KV capacity of the embedded simulated engine in tokens", ge=1)
    ] = 262_144
    sim_prefill_us: Annotated[
        float, option("simulated engine", "simulated prefill cost per uncached prompt token, microseconds", ge=0)
    ] = 20.0

    def __post_init__(self) -> None:
        if not self.upstream:
            raise ValueError(f"upstream: give an engine's URL, or {SIM_UPSTREAM} for the built-in simulated engine")
        if SIM_UPSTREAM in self.upstream and len(self.upstream) > 1:
            raise ValueError(f"upstream: {SIM_UPSTREAM} (the built-in simulated engine) cannot be one of several")
        for entry in self.upstream if not self.embedded_sim else ():
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
        if self.decision_log and not self.admin_token:
            raise ValueError("decision_log: the view is admin-only: set --admin-token too")
        if self.decision_log_text and not self.decision_log:
            raise ValueError("decision_log_text: needs --decision-log N")
        if self.state and urlsplit(self.state).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("state: expected redis://host:port[/db] (or rediss://, unix://)")
        if self.state and importlib.util.find_spec("redis") is None:
            raise ValueError("state: needs the 'state' extra (pip install 'prefixgate[state]')")
        if self.namespace_secret and len(self.namespace_secret) < 16:
            raise ValueError("namespace_secret: must be at least 16 characters")
        if self.api_key and self.state and not self.namespace_secret:
            raise ValueError(
                "namespace_secret: required with --api-key and --state: every gateway sharing the state must map a "
                "key to the same namespace (give them all the same secret)"
            )
        if self.tokenizer and importlib.util.find_spec("tokenizers") is None:
            raise ValueError("tokenizer: needs the 'tokenizer' extra (pip install 'prefixgate[tokenizer]')")
        if self.tokenizer not in {"", TOKENIZER_AUTO} and not os.path.isfile(tokenizer_file(self.tokenizer)):
            raise ValueError(f"tokenizer: no such file: {tokenizer_file(self.tokenizer)}")
        if self.kv_events_endpoint and importlib.util.find_spec("zmq") is None:
            raise ValueError("kv_events_endpoint: needs the 'events' extra (pip install 'prefixgate[events]')")
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
        # Secrets travel in HTTP headers: only visible ASCII survives every client and server unchanged.
        for name in ("api_key", "admin_token", "upstream_api_key", "namespace_secret"):
            values = getattr(self, name)
            for value in values if isinstance(values, tuple) else (values,):
                if not all("!" <= ch <= "~" for ch in value):
                    raise ValueError(f"{name}: must be visible ASCII characters (no spaces or control characters)")

    @property
    def upstreams(self) -> list[tuple[str, str]]:
        """Every engine replica as ``(engine kind, base URL without trailing slash)``, in the order given; the
        embedded simulated engine when none was given. ``KIND=URL`` overrides ``--engine`` for one replica."""
        if self.embedded_sim:
            return [(self.engine, f"http://127.0.0.1:{self.sim_port}")]
        out = []
        if not self.upstream:
            raise ValueError(f"upstream: give an engine's URL, or {SIM_UPSTREAM} for the built-in simulated engine")
        if SIM_UPSTREAM in self.upstream and len(self.upstream) > 1:
            raise ValueError(f"upstream: {SIM_UPSTREAM} (the built-in simulated engine) cannot be one of several")
        for entry in self.upstream if not self.embedded_sim else ():
            kind, url = _split_upstream(entry)
            out.append((kind or self.engine, url.rstrip("/")))
        return out

    @property
    def upstream_url(self) -> str:
        """The first upstream base URL (the embedded simulated engine when none was given), without trailing slash."""
        return self.upstreams[0][1]

    @property
    def embedded_sim(self) -> bool:
        """``--upstream sim://``: ``prefixgate serve`` starts the built-in simulated engine itself."""
        return self.upstream == (SIM_UPSTREAM,)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for the start-up log line, secrets masked."""
        out = msgspec.structs.asdict(self)
        for secret in ("admin_token", "upstream_api_key", "namespace_secret"):
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


class Option(NamedTuple):
    """What the command line and the docs need of one setting (derived from its declaration)."""

    help: str
    kind: str  # "flag": a store_true switch; "bool": --x / --no-x; "multi": repeatable; "value": one value
    group: str


def _options() -> dict[str, Option]:
    hints = get_type_hints(Settings, include_extras=True)
    defaults = msgspec.structs.asdict(Settings())
    out = {}
    for name in Settings.__struct_fields__:
        meta = next(m for m in hints[name].__metadata__ if isinstance(m, msgspec.Meta))
        default = defaults[name]
        if isinstance(default, bool):
            kind = "bool" if default else "flag"
        else:
            kind = "multi" if isinstance(default, tuple) else "value"
        out[name] = Option(meta.description or "", kind, (meta.extra or {})["group"])
    return out


OPTIONS: dict[str, Option] = _options()

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting, in one argument group per feature; unset flags stay absent so env and
    defaults apply."""
    groups: dict[str, Any] = {}
    for name, (help_text, kind, group_name) in OPTIONS.items():
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        group = groups[group_name]
        flag = "--" + name.replace("_", "-")
        if kind == "flag":
            group.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif kind == "bool":
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif kind == "multi":
            group.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (_, kind, _) in OPTIONS.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None or (kind == "multi" and not raw.strip()):  # an empty list is an unset one
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


def tokenizer_file(path: str) -> str:
    """``--tokenizer``'s file: the path given, or the ``tokenizer.json`` in a model directory (as vLLM is given)."""
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def local_tokenizer(model: str) -> str | None:
    """Where this host keeps the tokenizer of the model an engine names (``--tokenizer auto``): the model's
    directory (vLLM's and SGLang's ``/v1/models`` name it as ``root`` when they were started on a path), or the
    Hugging Face cache's copy of a hub model (no download); None when neither is here."""
    if os.path.isfile(tokenizer_file(model)) and (os.path.isdir(model) or model.endswith(".json")):
        return model
    try:
        from huggingface_hub import try_to_load_from_cache  # installed with the 'tokenizer' extra's tokenizers
    except ImportError:  # pragma: no cover - tokenizers depends on huggingface-hub
        return None
    try:
        cached = try_to_load_from_cache(model, "tokenizer.json")
    except ValueError:  # not a hub id (a path elsewhere, a served name): nothing cached
        return None
    return cached if isinstance(cached, str) else None


def load_settings(
    cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Merge defaults, environment, CLI values (an ``argparse`` namespace's dict) and explicit overrides."""
    merged = _env_values(os.environ if environ is None else environ)
    merged.update({k: v for k, v in (cli or {}).items() if k in OPTIONS})
    merged.update(overrides)
    for name, (_, kind, _) in OPTIONS.items():
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
