"""Citation positions mapped back to the client's order, whole and streamed; usage read from all three APIs."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from engines.base import cached_tokens_from_usage, prompt_tokens_from_usage
from gateway.wire.citations import BlockPositions

MAP = BlockPositions({0: 2, 2: 0}, {1: 0, 0: 1})


def _event(name: str, payload: dict[str, Any], end: str = "\n\n") -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}{end}".encode()


def _delta(citation: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": citation}}


STREAM = b"".join(
    [
        _event("message_start", {"type": "message_start", "message": {"content": [], "usage": {"input_tokens": 3}}}),
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "", "citations": []}},
        ),
        _event("content_block_delta", _delta({"type": "char_location", "document_index": 0, "cited_text": "a"})),
        _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "citation"}},
        ),
        _event("content_block_delta", _delta({"type": "search_result_location", "search_result_index": 1})),
        _event("content_block_delta", _delta({"type": "page_location", "document_index": 1})),
        _event("message_stop", {"type": "message_stop"}),
    ]
)


def _indices(stream: bytes) -> list[tuple[str, int]]:
    found = []
    for event in stream.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                delta = json.loads(line[6:]).get("delta", {})
                for name in ("document_index", "search_result_index"):
                    if name in delta.get("citation", {}):
                        found.append((name, delta["citation"][name]))
    return found


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12, unique=True))
def test_a_stream_cut_anywhere_comes_out_remapped_and_otherwise_unchanged(cuts: list[int]) -> None:
    stream = MAP.stream()
    bounds = [0, *sorted(cuts), len(STREAM)]
    out = b"".join(stream.feed(STREAM[a:b]) for a, b in itertools.pairwise(bounds)) + stream.flush()
    assert _indices(out) == [("document_index", 2), ("search_result_index", 0), ("document_index", 1)]
    untouched = [e for e in STREAM.split(b"\n\n") if b"citations_delta" not in e]
    assert [e for e in out.split(b"\n\n") if b"citations_delta" not in e] == untouched


def test_complete_events_leave_at_once_and_crlf_streams_work() -> None:
    stream = MAP.stream()
    first = _event("content_block_delta", _delta({"document_index": 2}), end="\r\n\r\n")
    out = stream.feed(first + b"event: ping\r\ndata: {}")
    assert out.endswith(b"\r\n\r\n") and b'"document_index":0' in out  # sent before the next event is complete
    assert stream.flush() == b"event: ping\r\ndata: {}"


def test_whole_answer_remapped_other_fields_byte_for_byte() -> None:
    body = (b'{"id":"msg_1","content":[{"type":"text","text":"x","citations":[{"type":"char_location",'
            b'"document_index":0,"cited_text":"a"}]}],"usage":{"input_tokens":1,  "output_tokens":2}}')  # fmt: skip
    out = MAP.json(body)
    assert json.loads(out)["content"][0]["citations"][0]["document_index"] == 2
    assert out.endswith(b'"usage":{"input_tokens":1,  "output_tokens":2}}')
    unchanged = b'{"id":"msg_1","content":[{"type":"text","text":"x"}]}'
    assert MAP.json(unchanged) is unchanged
    assert MAP.inverse().inverse() == MAP


def test_usage_of_each_api() -> None:
    chat = {"usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}}}
    responses = {"type": "response.completed",
                 "response": {"usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 8}}}}  # fmt: skip
    anthropic_start = {"type": "message_start",
                       "message": {"usage": {"input_tokens": 3, "cache_read_input_tokens": 9}}}  # fmt: skip
    anthropic_whole = {"usage": {"input_tokens": 3, "cache_read_input_tokens": 9, "cache_creation_input_tokens": 2}}
    llama = {"timings": {"cache_n": 5}}
    llama_last_chunk = {"choices": [], "timings": {"cache_n": 154, "prompt_n": 1}}  # a streamed answer's last chunk
    every = (chat, responses, anthropic_start, anthropic_whole, llama, llama_last_chunk)
    assert [cached_tokens_from_usage(p) for p in every] == [4, 8, 9, 9, 5, 154]
    assert [prompt_tokens_from_usage(p) for p in every] == [10, 12, 12, 14, None, 155]
    assert cached_tokens_from_usage({"type": "response.created", "response": {"usage": None}}) is None
