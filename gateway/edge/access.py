"""Who is calling the index API: the admin, a client key (named by its namespace), or anyone on an open gateway.

The owner a call resolves to scopes what it sees and what it leaves behind: ``None`` is the admin (or every
caller of a gateway with neither an admin token nor client keys), a ``k<8 hex>`` namespace is one client key.
See docs/reliability.md, "Tenancy", for which routes need what.
"""

from __future__ import annotations

import hmac
from collections.abc import Hashable, Mapping

from gateway.errors import Unauthorized
from gateway.ids import KeyNamespaces
from gateway.settings import Settings

__all__ = ["API_KEY", "Access", "index_key", "presented_key"]

API_KEY: Hashable = ("index-api",)
"""The prefix key under which the index API files the admin's batches."""


def index_key(owner: str | None) -> Hashable:
    """The prefix key of the index API's view: one per client key, one for the admin (and open gateways)."""
    return API_KEY if owner is None else ("index-api", owner)


def presented_key(headers: Mapping[str, str]) -> bytes:
    """The key a caller presents: ``Authorization: Bearer KEY``, or ``x-api-key: KEY`` as Anthropic clients send it
    (only without an ``Authorization`` header). Empty when there is none."""
    if "authorization" not in headers and "x-api-key" in headers:
        return headers["x-api-key"].strip().encode("latin-1")
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""


class Access:
    """The one auth check: the key a caller presents (``presented_key``) against the admin token and the client keys,
    in constant time. The proxy routes need a client key (``client``); the index API takes either (``identify``)."""

    def __init__(self, settings: Settings, namespaces: KeyNamespaces | None = None) -> None:
        self._admin = settings.admin_token.encode()
        self._keys = [key.encode() for key in settings.api_key]
        self._namespaces = namespaces or KeyNamespaces(self._keys, settings.namespace_secret.encode() or None)

    @property
    def keyed(self) -> bool:
        """Whether clients must present a key on the proxy routes."""
        return bool(self._keys)

    def client(self, headers: Mapping[str, str]) -> str | None:
        """A proxy route's caller: the namespace of its client key (None on a gateway without keys)."""
        if not self._keys:
            return None
        namespace = self._match(presented_key(headers))
        if namespace is None:
            raise Unauthorized("missing or invalid API key", code="invalid_api_key")
        return namespace

    def identify(self, headers: Mapping[str, str]) -> str | None:
        """An index API caller: ``None`` for the admin (or anyone on an open gateway), else its key's namespace."""
        if not self._admin and not self._keys:
            return None
        offered = presented_key(headers)
        if self._admin and hmac.compare_digest(offered, self._admin):
            return None
        namespace = self._match(offered)
        if namespace is None:
            raise Unauthorized("this route needs the admin token or a client API key", code="invalid_api_key")
        return namespace

    def require_admin(self, headers: Mapping[str, str]) -> None:
        """State-changing routes need the admin token when one is configured (engine hooks send it)."""
        if self._admin and not hmac.compare_digest(presented_key(headers), self._admin):
            raise Unauthorized("this route needs the admin token", code="admin_token_required")

    def _match(self, offered: bytes) -> str | None:
        matched = None
        for key in self._keys:  # every key compared, so the time taken does not tell which one matched
            if hmac.compare_digest(offered, key):
                matched = key
        return None if matched is None else self._namespaces[matched]
