"""Citation mapping through a real ``prefixgate serve``: an engine on a real socket streams a citation cut across
network chunks (``[``, ``2``, ``]``), and the client reads its own numbering back."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest

from tests.e2e.servers import gateway_process, receive_body, serve_in_thread
from tests.e2e.test_meaning_serve import DOCS  # the same four landmarks

pytestmark = pytest.mark.timeout(90)

CITED: list[str] = []  # the numbers the engine cited, in the numbering it was shown
# the tower last for the client, and the longest of the four: the gateway sends new sources longest first
TOWER = DOCS[3] + " It was the tallest structure in the world until 1930."
SYSTEM = "Cite them as [n].\n\nSources:\n" + "\n".join(f"[{i}] {doc}" for i, doc in enumerate([*DOCS[:3], TOWER], 1))


async def engine(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An OpenAI-style engine that cites, in its own prompt's numbering, the source about the Eiffel Tower."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body = await receive_body(receive)
    system = json.loads(body)["messages"][0]["content"]
    number = next(m.group(1) for m in re.finditer(r"^\[(\d+)\] (.*)$", system, re.M) if "Eiffel" in m.group(2))
    CITED.append(number)
    pieces = ["It is in Paris ", "[", number, "]; see Doc", "ument ", number, "."]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for piece in pieces:
        event = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
        await send({"type": "http.response.body", "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                    "more_body": True})  # fmt: skip
        await asyncio.sleep(0.02)  # separate network writes
    done = {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    tail = b"data: " + json.dumps(done).encode() + b"\n\ndata: [DONE]\n\n"
    await send({"type": "http.response.body", "body": tail, "more_body": False})


def test_streamed_citation_split_across_chunks_comes_back_in_the_clients_numbering() -> None:
    with (
        serve_in_thread(engine) as upstream,
        gateway_process("--upstream", upstream, "--citation-mapping", "--log-level", "warning") as base,
    ):
        request = {"model": "m", "stream": True, "messages": [{"role": "system", "content": SYSTEM},
                                                               {"role": "user", "content": "Where is it?"}]}  # fmt: skip
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=request, timeout=30) as r:
            result = json.loads(r.headers["x-prefixgate-result"])
            raw = b"".join(r.iter_raw())
    assert result["mapped"] == {"cite_by_number": 1}
    assert CITED == ["1"]  # the engine was shown the tower first, under another number
    text = "".join(
        choice["delta"].get("content", "")
        for event in raw.decode().split("\n\n")
        if event.startswith("data: {")
        for choice in json.loads(event[6:])["choices"]
    )
    assert text == "It is in Paris [4]; see Document 4."
    assert raw.endswith(b"data: [DONE]\n\n")
