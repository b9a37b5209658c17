"""The upstream is marked done (``on_finish``) before the client can see the end of its response."""

from __future__ import annotations

from typing import Any

import anyio

from gateway.proxy import _Call


def test_finish_runs_once_and_before_the_last_body_message() -> None:
    events: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        events.append("last body" if not message.get("more_body", False) else "body")

    call = _Call(send, "req-1", "/v1/completions", 0.0, [])
    call.on_finish = lambda: events.append("finish")

    async def run() -> None:
        await call.send({"type": "http.response.body", "body": b"x", "more_body": True})
        await call.end()
        call.finish()  # the handler's safety net must not run it twice

    anyio.run(run)
    assert events == ["body", "finish", "last body"]
