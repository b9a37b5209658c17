"""The upstream is marked done (``PlannedRequest.finish``) before the client can see the end of its response."""

from __future__ import annotations

from typing import Any

import anyio

from engines.llamacpp.slots import SlotTable
from gateway.metrics import Metrics
from gateway.planner import PlannedRequest
from gateway.proxy import _Call
from gateway.residency import Residency


def test_finish_runs_once_and_before_the_last_body_message() -> None:
    events: list[str] = []
    slots = SlotTable.of(1)

    async def send(message: dict[str, Any]) -> None:
        events.append(f"last body, {slots.slots[0].in_flight} in flight" if not message["more_body"] else "body")

    planned = PlannedRequest("req-1", Residency(max_requests=8, stateless=False), Metrics(), {})
    planned.slots, planned.slot = slots, slots.choose(())
    planned.slots.reserve(0)  # a second request on the same slot: one finish must release one reservation only
    call = _Call(send, "req-1", "/v1/completions", 0.0, [], planned=planned)

    async def run() -> None:
        await call.send({"type": "http.response.body", "body": b"x", "more_body": True})
        await call.end()
        call.finish()  # the handler's safety net must not release the slot a second time

    anyio.run(run)
    assert events == ["body", "last body, 1 in flight"]
    assert slots.slots[0].in_flight == 1
