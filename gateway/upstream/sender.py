"""The pooled upstream client and the header rules for both directions of the proxy."""

from __future__ import annotations

from collections.abc import Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from cachetools import LRUCache

from gateway.settings import Settings

__all__ = [
    "HOP_BY_HOP",
    "UpstreamSender",
    "build_client",
    "request_headers",
    "response_headers",
    "rewrite_location",
]

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
    settings: Settings, transport: httpx.AsyncBaseTransport, base_url: str | None = None
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
        follow_redirects=False,
        trust_env=False,
        # A proxy must never keep one user's upstream cookies and send them with another user's request.
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


class UpstreamSender:
    """Sends the proxy's requests through the client's transport, without the client's auth, redirect and cookie
    layers: a proxy follows no redirects, keeps no cookies and adds no credentials of the client's own, and those
    layers cost ~5% of its CPU per request (py-spy, ``python -m bench proxy``). The upstream's URL for each
    target is parsed once (a small LRU map), not per request."""

    def __init__(self, client: httpx.AsyncClient, transport: httpx.AsyncBaseTransport) -> None:
        self.base = str(client.base_url).rstrip("/")  # the upstream's URL, without a trailing slash
        self._timeout = client.timeout.as_dict()
        self._transport = transport
        self._urls: LRUCache[str, httpx.URL] = LRUCache(maxsize=256)

    def build(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> httpx.Request:
        """The upstream request with exactly ``headers``: no client defaults (``user-agent``, ``accept-encoding``),
        no cookies, so the engine sees what the user sent."""
        url = self._urls.get(target)
        if url is None:
            url = self._urls[target] = httpx.URL(self.base + target)
        return httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": self._timeout})

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; the response body is streamed (read it, then ``aclose`` it)."""
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response


def request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    *,
    strip_authorization: bool,
    upstream_api_key: str,
    extra: dict[str, str],
) -> list[tuple[bytes, bytes]]:
    """Client headers minus hop-by-hop and control headers, with the gateway's own additions.

    The client's ``Authorization`` (and ``x-api-key``, Anthropic's form) is forwarded unless it was meant for the
    gateway (``strip_authorization``) or the gateway has its own upstream key. Fields that ``Connection`` names
    are connection-specific too and are dropped (RFC 9110 §7.6.1), whatever their name.
    """
    drop_auth = strip_authorization or bool(upstream_api_key)
    client_headers = list(client_headers)
    replaced = {k.encode("latin-1") for k in extra} | _connection_named(client_headers)
    out: list[tuple[bytes, bytes]] = []
    for name, value in client_headers:
        lname = name.lower()
        if lname in _HOP_BY_HOP_BYTES or lname in replaced or lname.startswith(_CONTROL_PREFIXES_BYTES):
            continue
        if drop_auth and lname in (b"authorization", b"x-api-key"):
            continue
        out.append((lname, value))
    if upstream_api_key:
        out.append((b"authorization", f"Bearer {upstream_api_key}".encode("latin-1")))
    out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
    return out


def _connection_named(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """The field names listed in the request's ``Connection`` fields (lower-cased)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return named


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


def rewrite_location(headers: list[tuple[bytes, bytes]], upstream_base: str) -> list[tuple[bytes, bytes]]:
    """A redirect's ``Location`` that names the upstream (its URL, or its URL without the scheme) rewritten to the
    gateway's own origin, as nginx's ``proxy_redirect default`` does: the path after the upstream's URL, as a
    path-absolute reference the client resolves against the gateway's URL. The internal address never reaches the
    client, and the gateway's origin is not taken from the client's ``Host`` (a cache in front could be poisoned
    with it). Any other ``Location`` is kept as it is."""
    base = upstream_base.encode("latin-1").lower()
    prefixes = (base, base[base.find(b"//") :])  # http://engine:8000, //engine:8000
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        out.append((name, _own_location(value, prefixes) if name == b"location" else value))
    return out


def _own_location(location: bytes, upstream_prefixes: tuple[bytes, ...]) -> bytes:
    lowered = location.lower()
    for prefix in upstream_prefixes:
        rest = location[len(prefix) :]
        if lowered.startswith(prefix) and rest[:1] in (b"", b"/", b"?", b"#"):
            return rest if rest[:1] == b"/" else b"/" + rest
    return location
