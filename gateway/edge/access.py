"""Who is calling the index API: the admin, a client key (named by its namespace), or anyone on an open gateway.

The owner a call resolves to scopes what it sees and what it leaves behind: ``None`` is the admin (or every
caller of a gateway with neither an admin token nor client keys), a ``k<8 hex>`` namespace is one client key.
See docs/reliability.md, "Tenancy", for which routes need what.
"""

from __future__ import annotations

import hmac
from collections.abc import Hashable

from gateway.errors import Unauthorized
from gateway.ids import KeyNamespaces
from gateway.settings import Settings

__all__ = ["API_KEY", "Access", "index_key"]

API_KEY: Hashable = ("index-api",)
"""The prefix key under which the index API files the admin's batches."""


def index_key(owner: str | None) -> Hashable:
    """The prefix key of the index API's view: one per client key, one for the admin (and open gateways)."""
    return API_KEY if owner is None else ("index-api", owner)


def _bearer(authorization: str) -> bytes:
    scheme, _, token = authorization.partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""


class Access:
    """Checks ``Authorization`` headers against the admin token and the client keys, in constant time."""

    def __init__(self, settings: Settings, namespaces: KeyNamespaces | None = None) -> None:
        self._admin = settings.admin_token.encode()
        self._keys = [key.encode() for key in settings.api_key]
        self._namespaces = namespaces or KeyNamespaces(self._keys, settings.namespace_secret.encode() or None)

    def identify(self, authorization: str) -> str | None:
        """The caller's owner: ``None`` for the admin (or anyone on an open gateway), else its key's namespace."""
        if not self._admin and not self._keys:
            return None
        offered = _bearer(authorization)
        if self._admin and hmac.compare_digest(offered, self._admin):
            return None
        matched = None
        for key in self._keys:  # every key compared, so the time taken does not tell which one matched
            if hmac.compare_digest(offered, key):
                matched = key
        if matched is None:
            raise Unauthorized("this route needs the admin token or a client API key", code="invalid_api_key")
        return self._namespaces[matched]

    def require_admin(self, authorization: str) -> None:
        """State-changing routes need the admin token when one is configured (engine hooks send it)."""
        if self._admin and not hmac.compare_digest(_bearer(authorization), self._admin):
            raise Unauthorized("this route needs the admin token", code="admin_token_required")
