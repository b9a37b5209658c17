"""The whole app in-process, its upstream a respx router behind an ``httpx.MockTransport``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import Settings, load_settings

UPSTREAM = "http://engine.test"

AppFactory = Callable[..., Any]


@pytest.fixture
def upstream() -> respx.Router:
    return respx.Router(base_url=UPSTREAM, assert_all_called=False)


def make_settings(**overrides: Any) -> Settings:
    return load_settings(environ={}, upstream=UPSTREAM, **overrides)


class _Body(httpx.AsyncByteStream):
    """A network-like body: unlike bytes given to ``httpx.Response``, it is not read in advance."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.content


def _as_network(router: respx.Router) -> Callable[[httpx.Request], Any]:
    async def handler(request: httpx.Request) -> httpx.Response:
        response: httpx.Response = await router.async_handler(request)
        if isinstance(response.stream, httpx.AsyncByteStream) and not response.is_stream_consumed:
            return response
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Body(response.content), request=request
        )

    return handler


@pytest.fixture
def gateway(upstream: respx.Router) -> AppFactory:
    """``async with gateway(**settings) as client`` gives a test client for a fresh app."""

    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[AsyncTestClient[Any]]:
        app = create_app(make_settings(**overrides), transport=httpx.MockTransport(_as_network(upstream)))
        async with AsyncTestClient(app=app) as client:
            yield client

    return factory
