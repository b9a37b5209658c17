"""Gateway request ids: mint ``req-<32 hex>``, or honour a valid client ``X-Request-Id`` inside its namespace.

The id a request gets is the id the engine caches its prompt under and the id eviction callbacks name later,
so two clients must never end up with the same id:

- with API keys configured, a client id ``abc`` becomes ``k<8 hex>-abc``, where the 8 hex digits are an HMAC of
  the client's key under a per-process random salt (``KeyNamespaces``): two keys never share a namespace, and the
  namespace reveals nothing about the key (it cannot be used to test guesses offline);
- without keys there are no tenants, but a client id must still never stand for a gateway-minted id: ids that
  start with ``req-`` (in any case), that an engine's id mangling would turn into one (``chatcmpl-req-...``), or
  that eviction handling drops (``HEALTH_CHECK...``) become ``c-<id>``.

Minted ids carry 128 random bits and are never namespaced. The effective id is what the engine sees, what the
client gets back in ``X-Request-Id``, and what ``/requests`` and eviction callbacks show.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

from scheduler.ids import mint_request_id, normalize_request_id

__all__ = ["CLIENT_PREFIX", "REQUEST_ID_PATTERN", "KeyNamespaces", "mint_request_id", "resolve_request_id"]

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_PREFIX = "c-"
_MINTED_PREFIX = "req-"


class KeyNamespaces:
    """The ``k<8 hex>`` namespace of each configured API key (salted per process, computed once per key)."""

    __slots__ = ("_namespaces",)

    def __init__(self, keys: Iterable[bytes], salt: bytes | None = None) -> None:
        salt = secrets.token_bytes(16) if salt is None else salt
        self._namespaces = {key: "k" + hmac.new(salt, key, hashlib.sha256).hexdigest()[:8] for key in keys}

    def __getitem__(self, key: bytes) -> str:
        return self._namespaces[key]


def resolve_request_id(client_value: str | None, namespace: str | None = None) -> str:
    """The id for this request: the client's (namespaced) when it is well-formed, a fresh one otherwise."""
    if not client_value or not REQUEST_ID_PATTERN.fullmatch(client_value):
        return mint_request_id()
    if namespace is not None:
        return f"{namespace}-{client_value}"
    if _reserved(client_value):
        return CLIENT_PREFIX + client_value
    return client_value


def _reserved(value: str) -> bool:
    """Whether ``value`` could be taken for a gateway-minted id once an engine has reported it back."""
    normalized = normalize_request_id(value)
    return (
        normalized is None or normalized.lower().startswith(_MINTED_PREFIX) or value.lower().startswith(_MINTED_PREFIX)
    )
