"""The exchange's settle phase: the upstream is marked done before the client sees the end of its response; and the
cached-token count is read from event streams whatever their line endings."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from engines.llamacpp.slots import SlotTable
from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.planning.planner import PlannedRequest
from gateway.planning.residency import Residency
from gateway.proxy.pipeline import Exchange
from gateway.proxy.relay import Relayed
from gateway.proxy.usage import UsageSniffer
from gateway.settings import load_settings


def test_finish_runs_once_and_before_the_last_body_message() -> None:
    events: list[str] = []
    slots = SlotTable.of(1)

    async def send(message: dict[str, Any]) -> None:
        events.append(f"last body, {slots.slots[0].in_flight} in flight" if not message["more_body"] else "body")

    planned = PlannedRequest("req-1", Residency(max_requests=8, stateless=False), Metrics(), {})
    planned.slots, planned.slot = slots, slots.choose(())
    planned.slots.reserve(0)  # a second request on the same slot: one finish must release one reservation only
    proxy = create_app(load_settings(environ={}, upstream="http://engine.test")).state.proxy
    exchange = Exchange(proxy, {"type": "http", "headers": []}, _never, send)
    exchange.planned = planned

    async def run() -> None:
        await exchange.to_client({"type": "http.response.body", "body": b"x", "more_body": True})
        await exchange.settle(Relayed(200))
        exchange.close()  # the proxy's safety net must not release the slot a second time

    anyio.run(run)
    assert events == ["body", "last body, 1 in flight"]
    assert slots.slots[0].in_flight == 1


async def _never() -> dict[str, Any]:
    raise AssertionError("settling reads nothing from the client")


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 7}}}'


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_usage_sniffer_reads_events_ending_in_lf_or_crlf(newline: bytes) -> None:
    end = newline * 2
    stream = b'data: {"choices": [{"delta": {"content": "hi"}}]}' + end + USAGE + end + b"data: [DONE]" + end
    sniffer = UsageSniffer()
    for i in range(0, len(stream), 5):  # chunks that cut events, lines and CRLF pairs in two
        sniffer.feed(stream[i : i + 5])
    assert sniffer.usage is not None
    assert sniffer.usage["usage"]["prompt_tokens_details"]["cached_tokens"] == 7


def test_usage_sniffer_waits_for_the_end_of_the_event() -> None:
    sniffer = UsageSniffer()
    sniffer.feed(USAGE + b"\r\n")
    assert sniffer.usage is None
    sniffer.feed(b"\r\n")
    assert sniffer.usage is not None
