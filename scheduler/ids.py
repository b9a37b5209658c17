"""Request ids: minting, and normalising the mangled forms engines report back on eviction.

Engines decorate the id the gateway stamped (``req-<hex>``) before echoing it in eviction callbacks:

- OpenAI-style servers prefix ``cmpl-``, ``chatcmpl-`` or ``batch-``;
- vLLM appends ``-<n>-<hex>`` (``cmpl-req-ab12-0-1a2b3c4d``);
- newer vLLM appends ``-<8 random chars>`` to any external id. That suffix cannot be told apart from a
  legitimate ``-xxxxxxxx`` ending, so it is only a *candidate*: :func:`request_id_candidates` lists the
  possibilities in order and the caller keeps the first one its index knows (``LiveIndex.resolve``).

Health-check requests (``HEALTH_CHECK...``) are dropped.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

__all__ = ["mint_request_id", "normalize_request_id", "normalize_request_ids", "request_id_candidates"]

_ENGINE_PREFIXES = ("chatcmpl-", "cmpl-", "batch-")
_VLLM_SUFFIX = re.compile(r"^(req-[^-]+)-\d+-[0-9a-f]+$")
_RANDOM_SUFFIX = re.compile(r"^(.+)-[0-9A-Za-z]{8}$")
_HEALTH_CHECK = "HEALTH_CHECK"


def mint_request_id() -> str:
    """Return a fresh ``req-<32 hex>`` id (128 random bits; no ``-`` after ``req-``, so vLLM suffixes strip)."""
    return "req-" + secrets.token_hex(16)


def normalize_request_id(raw: str) -> str | None:
    """Return the id the gateway stamped, given the id an engine reported; ``None`` for health checks."""
    if raw.startswith(_HEALTH_CHECK):
        return None
    rid = raw
    for prefix in _ENGINE_PREFIXES:
        if rid.startswith(prefix):
            rid = rid[len(prefix) :]
            break
    match = _VLLM_SUFFIX.match(rid)
    if match:
        rid = match.group(1)
    if not rid or rid.startswith(_HEALTH_CHECK):
        return None
    return rid


def normalize_request_ids(raw_ids: Iterable[str]) -> list[str]:
    """Normalise each id, drop health checks and empty ids, de-duplicate keeping the first occurrence's order."""
    seen: dict[str, None] = {}
    for raw in raw_ids:
        rid = normalize_request_id(raw)
        if rid is not None:
            seen.setdefault(rid, None)
    return list(seen)


def request_id_candidates(raw: str) -> list[str]:
    """Return the ids ``raw`` may stand for, most likely first; empty for health checks.

    The normalised id comes first, then the normalised id without a trailing ``-<8 chars>`` (newer vLLM), then
    the raw id itself (a client-chosen id that merely looks mangled).
    """
    rid = normalize_request_id(raw)
    if rid is None:
        return []
    candidates = [rid]
    match = _RANDOM_SUFFIX.match(rid)
    if match:
        candidates.append(match.group(1))
    if raw not in candidates:
        candidates.append(raw)
    return candidates
