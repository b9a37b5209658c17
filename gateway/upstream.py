"""The pooled upstream client and the header rules for both directions of the proxy."""

from __future__ import annotations

from collections.abc import Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from gateway.settings import Settings

__all__ = ["HOP_BY_HOP", "build_client", "build_request", "request_headers", "response_headers"]

# RFC 9110 §7.6.1 connection-specific fields, plus fields the transport recomputes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_CONTROL_PREFIXES = ("x-prefixgate-", "x-contextpilot-")


def build_client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None, base_url: str | None = None
) -> httpx.AsyncClient:
    """One pooled client per upstream. LLM streams are long, so the read timeout is minutes, not seconds."""
    return httpx.AsyncClient(
        base_url=base_url or settings.upstream_url,
        transport=transport,
        timeout=httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.write_timeout,
            pool=settings.pool_timeout,
        ),
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive,
            keepalive_expiry=30.0,
        ),
        follow_redirects=False,
        trust_env=False,
        # A proxy must never keep one user's upstream cookies and send them with another user's request.
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


def build_request(
    client: httpx.AsyncClient, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> httpx.Request:
    """The upstream request with exactly ``headers``: unlike ``client.build_request`` it merges no client defaults
    (``user-agent``, ``accept-encoding``) and no cookies, so the engine sees what the user sent."""
    return httpx.Request(
        method,
        str(client.base_url).rstrip("/") + target,
        headers=headers,
        content=body,
        extensions={"timeout": client.timeout.as_dict()},
    )


def request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    *,
    strip_authorization: bool,
    upstream_api_key: str,
    extra: dict[str, str],
) -> list[tuple[bytes, bytes]]:
    """Client headers minus hop-by-hop and control headers, with the gateway's own additions.

    The client's ``Authorization`` is forwarded unless it was meant for the gateway (``strip_authorization``)
    or the gateway has its own upstream key.
    """
    drop_auth = strip_authorization or bool(upstream_api_key)
    replaced = {k.encode("latin-1") for k in extra}
    out: list[tuple[bytes, bytes]] = []
    for name, value in client_headers:
        lname = name.lower()
        if lname in _HOP_BY_HOP_BYTES or lname in replaced or lname.startswith(_CONTROL_PREFIXES_BYTES):
            continue
        if drop_auth and lname == b"authorization":
            continue
        out.append((lname, value))
    if upstream_api_key:
        out.append((b"authorization", f"Bearer {upstream_api_key}".encode("latin-1")))
    out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
    return out


_HOP_BY_HOP_BYTES = frozenset(h.encode() for h in HOP_BY_HOP)
_CONTROL_PREFIXES_BYTES = tuple(p.encode() for p in _CONTROL_PREFIXES)
_RESPONSE_DROP = (_HOP_BY_HOP_BYTES - {b"content-length"}) | {b"x-request-id", b"date", b"server"}


def response_headers(upstream: httpx.Headers, *, keep_length: bool) -> list[tuple[bytes, bytes]]:
    """Upstream response headers the client may see (hop-by-hop fields removed)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in upstream.raw:
        lname = name.lower()
        if lname in _RESPONSE_DROP or (lname == b"content-length" and not keep_length):
            continue
        out.append((lname, value))
    return out
