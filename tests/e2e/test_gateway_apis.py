"""The official Anthropic and OpenAI SDKs on ``/v1/messages`` and ``/v1/responses``, through a real
``prefixgate serve`` process (client keys on) to the simulated engine, over real sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from engines.sim import SimConfig, create_sim_app
from tests.e2e.servers import gateway_process, serve_in_thread, wait_for

pytestmark = pytest.mark.timeout(90)

KEY = "e2e-secret"
TEXTS = {name: f"{name.capitalize()} report. " + " ".join(f"{name[:3]}{i}" for i in range(120)) for name in
         ("alpha", "beta", "gamma", "delta", "epsilon")}  # fmt: skip


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, str]]:
    with (
        serve_in_thread(create_sim_app(SimConfig(decode_us_per_token=500.0))) as engine,
        gateway_process("--upstream", engine, "--api-key", KEY, "--log-level", "warning") as gateway,
    ):
        yield gateway, engine


@pytest.fixture
def claude(stack: tuple[str, str]) -> Iterator[anthropic.Anthropic]:
    httpx.post(f"{stack[1]}/sim/reset")
    httpx.post(f"{stack[0]}/reset")
    with anthropic.Anthropic(base_url=stack[0], api_key=KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def oai(stack: tuple[str, str]) -> Iterator[openai.OpenAI]:
    httpx.post(f"{stack[1]}/sim/reset")
    httpx.post(f"{stack[0]}/reset")
    with openai.OpenAI(base_url=f"{stack[0]}/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


def last_seen(engine: str) -> dict[str, Any]:
    records: list[dict[str, Any]] = httpx.get(f"{engine}/sim/requests", params={"limit": 1}).json()
    return records[-1]


def documents(names: list[str], *, cite: bool = False) -> list[Any]:
    return [
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": TEXTS[name]},
            "title": name,
            **({"citations": {"enabled": True}} if cite else {}),
        }
        for name in names
    ]


def ask(names: list[str], question: str, *, cite: bool = False) -> dict[str, Any]:
    content = [*documents(names, cite=cite), {"type": "text", "text": question}]
    return {
        "model": "sim",
        "max_tokens": 4,
        "system": [{"type": "text", "text": "Answer from the documents.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": content}],
    }


def sent_titles(engine: str) -> list[str]:
    content = last_seen(engine)["body"]["messages"][0]["content"]
    return [block["title"] for block in content if block["type"] == "document"]


def metric(gateway: str, name: str, route: str) -> float:
    for line in httpx.get(f"{gateway}/metrics").text.splitlines():
        if line.startswith(f'{name}{{route="{route}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_messages_documents_reordered_and_cached(claude: anthropic.Anthropic, stack: tuple[str, str]) -> None:
    gateway, engine = stack
    before = metric(gateway, "prefixgate_engine_cached_tokens_total", "/v1/messages")
    first = claude.messages.create(**ask(["alpha", "beta", "gamma"], "Who wrote alpha?"))
    first_order = sent_titles(engine)
    raw = claude.messages.with_raw_response.create(**ask(["gamma", "delta", "alpha", "beta"], "And delta?"))
    second = raw.parse()
    seen = last_seen(engine)
    assert sent_titles(engine)[:3] == first_order  # the cached documents lead, in the order the engine holds them
    assert seen["headers"]["x-request-id"] == raw.headers["x-request-id"]
    assert "x-api-key" not in seen["headers"]  # the client key stays at the gateway
    client_blocks = {json.dumps(b, sort_keys=True) for b in documents(["gamma", "delta", "alpha", "beta"])}
    sent_blocks = seen["body"]["messages"][0]["content"]
    assert {json.dumps(b, sort_keys=True) for b in sent_blocks[:4]} == client_blocks
    assert sent_blocks[4] == {"type": "text", "text": "And delta?"}
    assert seen["body"]["system"] == ask([], "")["system"]
    assert first.usage.cache_read_input_tokens is not None
    assert second.usage.cache_read_input_tokens is not None
    assert second.usage.cache_read_input_tokens > second.usage.input_tokens  # three documents came from the cache
    result = json.loads(raw.headers["x-prefixgate-result"])
    assert result["reordered"] is True and result["predicted_cached_blocks"] == 3
    after = metric(gateway, "prefixgate_engine_cached_tokens_total", "/v1/messages")
    assert after - before == second.usage.cache_read_input_tokens + first.usage.cache_read_input_tokens


def _cited_pair(claude: anthropic.Anthropic, engine: str) -> tuple[list[str], list[str]]:
    claude.messages.create(**ask(["alpha", "beta", "gamma"], "First?", cite=True))
    held = sent_titles(engine)
    return held, list(reversed(held))  # the engine will be sent ``held``, the client sees the reverse


def test_citations_point_at_the_clients_document(claude: anthropic.Anthropic, stack: tuple[str, str]) -> None:
    held, order = _cited_pair(claude, stack[1])
    answer = claude.messages.create(**ask(order, "Cite it.", cite=True))
    assert sent_titles(stack[1]) == held
    citation = answer.content[0].citations[0]  # type: ignore[union-attr]
    assert citation.type == "char_location"
    # the engine cited the first document it was sent; the client must be pointed at that same document
    assert order[citation.document_index] == held[0] == citation.document_title
    assert TEXTS[order[citation.document_index]].startswith(citation.cited_text)


def test_streamed_citations_and_usage(claude: anthropic.Anthropic, stack: tuple[str, str]) -> None:
    held, order = _cited_pair(claude, stack[1])
    with claude.messages.stream(**ask(order, "Cite it, streaming.", cite=True)) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text and message.content[0].type == "text"
    citation = message.content[0].citations[0]  # type: ignore[index]
    assert order[citation.document_index] == held[0] == citation.document_title
    assert message.usage.cache_read_input_tokens and message.usage.cache_read_input_tokens > 0


def test_messages_errors_are_anthropic_errors(claude: anthropic.Anthropic, stack: tuple[str, str]) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="sim", max_tokens=4, messages="nope")  # type: ignore[arg-type]
    assert isinstance(bad.value.body, dict) and bad.value.body["type"] == "error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    stranger = anthropic.Anthropic(base_url=stack[0], api_key="wrong", max_retries=0)
    with stranger, pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(**ask(["alpha"], "x"))
    # the SDK sends its key as a bearer token; clients written against Anthropic's API send x-api-key
    answer = httpx.post(f"{stack[0]}/v1/messages", json=ask(["alpha"], "x"), headers={"x-api-key": KEY})
    assert answer.status_code == 200 and answer.json()["type"] == "message"
    assert "x-api-key" not in last_seen(stack[1])["headers"]  # the client key stays at the gateway
    broken = claude.messages.stream(**ask(["alpha"], "x"), extra_headers={"x-sim-fault": "midstream"})
    with pytest.raises(anthropic.APIStatusError), broken as stream:
        stream.until_done()


def tool_turn(names: list[str], question: str) -> list[Any]:
    results = json.dumps({"results": [{"id": name, "text": TEXTS[name]} for name in names]})
    return [
        {"type": "function_call", "call_id": "call_1", "name": "search", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": results},
        {"role": "user", "content": [{"type": "input_text", "text": question}]},
    ]


def sent_results(engine: str) -> list[str]:
    items = last_seen(engine)["body"]["input"]
    return [r["id"] for r in json.loads(items[1]["output"])["results"]]


def test_responses_tool_outputs_reordered_and_cached(oai: openai.OpenAI, stack: tuple[str, str]) -> None:
    gateway, engine = stack
    oai.responses.create(model="sim", instructions="Research.", input=tool_turn(["alpha", "beta", "gamma"], "q1"),
                         max_output_tokens=4)  # fmt: skip
    held = sent_results(engine)
    response = oai.responses.create(
        model="sim", instructions="Research.", input=tool_turn(["delta", *reversed(held)], "q2"), max_output_tokens=4
    )
    assert sent_results(engine)[:3] == held
    assert response.output_text
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens > 0
    with oai.responses.stream(model="sim", instructions="Research.", input=tool_turn(["epsilon", *held], "q3"),
                              max_output_tokens=5) as stream:  # fmt: skip
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) == 5 and final.output_text == "".join(deltas)
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens > 0
    assert metric(gateway, "prefixgate_engine_cached_tokens_total", "/v1/responses") >= (
        response.usage.input_tokens_details.cached_tokens + final.usage.input_tokens_details.cached_tokens
    )


def test_responses_plain_input_and_previous_response_id(oai: openai.OpenAI, stack: tuple[str, str]) -> None:
    raw = oai.responses.with_raw_response.create(model="sim", input="hello there", max_output_tokens=2)
    assert raw.parse().output_text
    chained = oai.responses.with_raw_response.create(
        model="sim", input="more", previous_response_id=raw.parse().id, max_output_tokens=2
    )
    assert json.loads(chained.headers["x-prefixgate-result"])["left_alone"] == {"previous_response_id": 1}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"model": "sim", "max_tokens": 2000, "stream": True,
                          "messages": [{"role": "user", "content": "long"}]}),
        ("/v1/responses", {"model": "sim", "max_output_tokens": 2000, "stream": True, "input": "long"}),
    ],
)  # fmt: skip
def test_client_disconnect_cancels_upstream(stack: tuple[str, str], path: str, body: dict[str, Any]) -> None:
    gateway, engine = stack
    before = httpx.get(f"{engine}/sim/stats").json()["cancelled"]
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", int(gateway.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), KEY.encode(), len(payload), payload)
        )
        first = sock.recv(4096)
        assert b"200 OK" in first and b"text/event-stream" in first
    wait_for(lambda: httpx.get(f"{engine}/sim/stats").json()["cancelled"] > before, 5, "the upstream cancellation")
    stats = httpx.get(f"{engine}/sim/stats").json()
    assert stats["cancelled"] == before + 1 and stats["in_flight"] == 0


def test_rewritten_stream_is_relayed_event_by_event(claude: anthropic.Anthropic, stack: tuple[str, str]) -> None:
    held, order = _cited_pair(claude, stack[1])
    body = {**ask(order, "Stream a long answer.", cite=True), "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{stack[0]}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=30) as answer:
        events = answer.iter_raw()
        first = next(events)
        # 2000 tokens at 0.5 ms each: the first events arrive while the engine is still generating
        assert httpx.get(f"{stack[1]}/sim/stats").json()["in_flight"] == 1
        rest = b"".join(events)
    assert first.startswith(b"event: message_start")
    assert held[0] == order[2]
    assert b'"document_index":2' in first + rest  # the citation was rewritten on the way
    assert rest.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_messages_documents_the_user_names_keep_the_clients_order(
    claude: anthropic.Anthropic, stack: tuple[str, str]
) -> None:
    """Meaning kept: once a text names a document by position or number, the documents go out as the client sent
    them (streamed or not); with nothing naming them, the same documents move."""
    claude.messages.create(**ask(["alpha", "beta", "gamma"], "Warm up."))
    held = sent_titles(stack[1])
    order = ["delta", *reversed(held)]
    moved = claude.messages.with_raw_response.create(**ask(order, "Which report is longest?"))
    assert sent_titles(stack[1]) != order and json.loads(moved.headers["x-prefixgate-result"])["reordered"] is True
    named = claude.messages.with_raw_response.create(**ask(order, "Summarize the second document only."))
    assert sent_titles(stack[1]) == order
    assert json.loads(named.headers["x-prefixgate-result"])["left_alone"] == {"referenced": 1}
    with claude.messages.stream(**ask(order, "What does document 3 say?")) as stream:
        assert "".join(stream.text_stream)
    assert sent_titles(stack[1]) == order
    meaning = 'prefixgate_groups_meaning_total{decision="leave_alone",format="document",reason="referenced"}'
    assert any(line.startswith(meaning) for line in httpx.get(f"{stack[0]}/metrics").text.splitlines())


def file_search(names: list[str], question: str) -> list[Any]:
    results = [{"file_id": f"file-{name}", "filename": f"{name}.txt", "score": 0.5, "text": TEXTS[name]}
               for name in names]  # fmt: skip
    return [
        {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["reports"], "results": results},
        {"role": "user", "content": [{"type": "input_text", "text": question}]},
    ]


def sent_files(engine: str) -> list[str]:
    return [r["filename"] for r in last_seen(engine)["body"]["input"][0]["results"]]


def test_responses_results_the_user_names_keep_the_clients_order(oai: openai.OpenAI, stack: tuple[str, str]) -> None:
    oai.responses.create(model="sim", input=file_search(["alpha", "beta", "gamma"], "Warm up."), max_output_tokens=2)
    held = [name.removesuffix(".txt") for name in sent_files(stack[1])]
    names = ["delta", *reversed(held)]
    order = [f"{name}.txt" for name in names]
    moved = oai.responses.with_raw_response.create(
        model="sim", input=file_search(names, "Which report is longest?"), max_output_tokens=2
    )
    assert sent_files(stack[1]) != order and json.loads(moved.headers["x-prefixgate-result"])["reordered"] is True
    named = oai.responses.with_raw_response.create(
        model="sim", input=file_search(names, "See result [2]: is it right?"), max_output_tokens=2
    )
    assert sent_files(stack[1]) == order
    assert json.loads(named.headers["x-prefixgate-result"])["left_alone"] == {"referenced": 1}
    ranked = "The results are ranked by relevance."
    with oai.responses.stream(
        model="sim", instructions=ranked, input=file_search(names, "Which is best?"), max_output_tokens=2
    ) as stream:
        assert stream.get_final_response().output_text
    assert sent_files(stack[1]) == order
