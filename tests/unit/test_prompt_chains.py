"""The whole prompt's chunk names: the walk that reads a request as sent feeds exactly what the planning walk feeds
when nothing is rewritten, on every route, so the prompt as sent and the prompt as forwarded compare."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.metrics import Metrics
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.settings import load_settings
from gateway.wire.chat import decode_request
from scheduler.prefixes import CHUNK_BYTES, common

TEXT = "A long text without any retrieved blocks in it. " * 40


def docs(order: tuple[int, ...]) -> str:
    inner = "\n".join(f'<document id="d{i}">{f"fact {i} " * 80}</document>' for i in order)
    return f"Answer from these.\n<documents>\n{inner}\n</documents>"


BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": TEXT}]}),
    "chat parts": (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": TEXT}]},
                {"role": "user", "content": "q"},
            ]
        },
    ),
    "completion": ("/v1/completions", {"model": "m", "prompt": TEXT}),
    "completion list of one": ("/v1/completions", {"model": "m", "prompt": [TEXT]}),
    "messages": (
        "/v1/messages",
        {"model": "m", "max_tokens": 4, "system": TEXT, "messages": [{"role": "user", "content": "q"}]},
    ),
    "responses": ("/v1/responses", {"model": "m", "instructions": TEXT, "input": "q"}),
}


def _planner() -> Planner:
    return Planner(load_settings(environ={}), Residency(max_requests=100, stateless=False), Metrics())


@pytest.mark.parametrize("name", sorted(BODIES))
def test_a_prompt_left_as_it_is_has_the_same_chain_sent_and_forwarded(name: str) -> None:
    route, body = BODIES[name]
    request = decode_request(msgspec.json.encode(body), route)
    planner = _planner()
    planned = planner.plan(planner.read(request, {}), "r1")
    assert planned.fields == {}
    assert len(planned.chain) >= len(TEXT) // CHUNK_BYTES - 1
    assert planned.chain == planner.sent_chain(request, {}, None)
    off = planner.plan(planner.read(request, {"x-prefixgate-reorder": "off"}), "r2")
    assert off.chain == planned.chain


def test_tenants_never_share_a_chain() -> None:
    route, body = BODIES["chat"]
    request = decode_request(msgspec.json.encode(body), route)
    planner = _planner()
    assert common(planner.sent_chain(request, {}, "key-a"), planner.sent_chain(request, {}, "key-b")) == 0


def test_a_rewritten_prompt_shares_its_chain_up_to_the_first_moved_block() -> None:
    for order in ((3, 1, 2), (2, 1, 3)):  # two orders: a cold index sends at most one of them as it is
        body = {
            "model": "m",
            "messages": [{"role": "system", "content": docs(order)}, {"role": "user", "content": "q"}],
        }
        request = decode_request(msgspec.json.encode(body), "/v1/chat/completions")
        planner = _planner()
        planned = planner.plan(planner.read(request, {}), "r1")
        if planned.fields:
            break
    sent = planner.sent_chain(request, {}, None)
    assert planned.fields, "the documents move (else the test proves nothing)"
    assert planned.chain != sent and len(planned.chain) == len(sent)
    assert common(planned.chain, sent) < len(sent)
