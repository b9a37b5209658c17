"""Gateway request ids: mint ``req-<32 hex>``, or honour a valid client ``X-Request-Id`` inside its namespace.

The id a request gets is the id the engine caches its prompt under and the id eviction callbacks name later,
so two clients must never end up with the same id:

- with API keys configured, a client id ``abc`` becomes ``k<8 hex>-abc``, where the 8 hex digits are an
  HMAC-SHA256 of the client's key under the deployment's ``--namespace-secret`` (``KeyNamespaces``): every gateway
  of a deployment maps a key, and so a client's id, to the same namespace and engine id; two keys never share a
  namespace (refused at start), and the namespace reveals nothing about the key (without the secret it cannot be
  used to test guesses offline). Without a secret (allowed only without ``--state``) a per-process random one;
- without keys there are no tenants, but a client id must still never stand for a gateway-minted id: ids that
  start with ``req-`` (in any case), that an engine's id mangling would turn into one (``chatcmpl-req-...``), or
  that eviction handling drops (``HEALTH_CHECK...``) become ``c-<id>``.

Minted ids carry 128 random bits and are never namespaced. The effective id is what the engine sees, what the
client gets back in ``X-Request-Id``, and what ``/requests`` and eviction callbacks show.

A client may choose its id in the ``X-Request-Id`` header or in the body, as SGLang's ``rid`` or vLLM's
``request_id`` (ContextPilot's online flow sends back, as ``rid``, the id ``/reorder`` returned). The header wins,
then ``rid``, then ``request_id`` (:func:`body_ids`); the same rules apply whichever carried it, and every id
field the client sent is forwarded holding the effective id.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from scheduler.ids import mint_request_id, normalize_request_id

__all__ = [
    "CLIENT_ID_FIELDS",
    "CLIENT_PREFIX",
    "REQUEST_ID_PATTERN",
    "NO_BODY_IDS",
    "BodyIds",
    "KeyNamespaces",
    "body_ids",
    "mint_request_id",
    "resolve_request_id",
]

CLIENT_ID_FIELDS = ("rid", "request_id")
"""Body fields that carry a request id a client chose (SGLang, vLLM), in order of precedence."""

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_PREFIX = "c-"
_MINTED_PREFIX = "req-"
_NAMESPACE_LABEL = b"prefixgate key namespace\0"  # this HMAC's purpose: the secret may serve no other by accident


class KeyNamespaces:
    """The ``k<8 hex>`` namespace of each configured API key: an HMAC-SHA256 of the key under ``secret`` (the
    deployment's; a random one per process when None), computed once per key."""

    __slots__ = ("_namespaces",)

    def __init__(self, keys: Iterable[bytes], secret: bytes | None = None) -> None:
        secret = secrets.token_bytes(32) if secret is None else secret
        self._namespaces = {
            key: "k" + hmac.new(secret, _NAMESPACE_LABEL + key, hashlib.sha256).hexdigest()[:8] for key in keys
        }
        if len(set(self._namespaces.values())) < len(self._namespaces):
            raise ValueError("two API keys share a namespace under this secret: change one key or the secret")

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


@dataclass(frozen=True, slots=True)
class BodyIds:
    """The id a client put in the body (the first string among :data:`CLIENT_ID_FIELDS`), which of those fields
    it sent as strings (forwarded holding the effective id) and which as lists (a batch's rids, kept as sent;
    any other shape is replaced like an absent id)."""

    value: str | None
    fields: tuple[str, ...]
    kept: tuple[str, ...]


NO_BODY_IDS = BodyIds(None, (), ())


def body_ids(top: Mapping[str, msgspec.Raw]) -> BodyIds:
    """Read the client's id fields from a body's raw top-level fields."""
    sent = {name: msgspec.json.decode(top[name]) for name in CLIENT_ID_FIELDS if name in top}
    fields = tuple(name for name, value in sent.items() if isinstance(value, str))
    kept = tuple(name for name, value in sent.items() if isinstance(value, list))
    return BodyIds(sent[fields[0]] if fields else None, fields, kept)


def _reserved(value: str) -> bool:
    """Whether ``value`` could be taken for a gateway-minted id once an engine has reported it back."""
    normalized = normalize_request_id(value)
    return (
        normalized is None or normalized.lower().startswith(_MINTED_PREFIX) or value.lower().startswith(_MINTED_PREFIX)
    )
