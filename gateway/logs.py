"""Logging set-up: text or JSON lines, the current request id on every record, no prompts, no secrets."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["JsonFormatter", "RequestIdFilter", "configure_logging", "log_access", "request_id_var"]

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("prefixgate_request_id", default="-")

_access = logging.getLogger("prefixgate.access")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_encoder = msgspec.json.Encoder()


class RequestIdFilter(logging.Filter):
    """Stamp each record with the request id of the task that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, message (and exc when present)."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(payload).decode()


def configure_logging(level: str, fmt: str) -> None:
    """Configure the root logger once for the process (called by the CLI, not by ``create_app``)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs one INFO line per upstream request (with URLs); numbers belong in /metrics.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_access(
    request_id: str, route: str, status: int, *, result: Mapping[str, Any], cached_tokens: int | None, started: float
) -> None:
    """One line per proxied request (``--access-log``): what was asked, what was found, what the engine reused.

    ``result`` is the planner's ``X-Prefixgate-Result`` (empty for routes it does not plan); no prompt text.
    """
    _access.info(
        "id=%s route=%s status=%d groups=%s reordered=%s predicted_cached_tokens=%s cached_tokens=%s latency_ms=%.1f",
        request_id,
        route,
        status,
        result.get("groups", "-"),
        str(result.get("reordered", "-")).lower(),
        result.get("predicted_cached_tokens", "-"),
        "-" if cached_tokens is None else cached_tokens,
        (time.perf_counter() - started) * 1000,
    )
