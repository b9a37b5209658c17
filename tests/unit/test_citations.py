"""Citation mapping of answers: whole JSON bodies, and SSE streams cut anywhere (a citation split across deltas)."""

from __future__ import annotations

import json
from itertools import pairwise

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.planning.citemap import CitationMap, CitationRewriter, citation_map
from gateway.planning.intercept import find_groups, splice

MAP = CitationMap(((1, 3), (2, 1), (3, 2)))  # the model's [1] is the client's [3], ...


def test_text_forms_are_mapped_once() -> None:
    rewriter = CitationRewriter([MAP])
    out = rewriter.text("See [1], [2, 3] and [Doc 1]; Document 2 agrees, Source #3 not. a[4] and [1-2] stay.")
    assert out == "See [3], [1, 2] and [Doc 3]; Document 1 agrees, Source #2 not. a[4] and [1-2] stay."
    assert rewriter.rewritten == 6


def test_map_of_a_spliced_group_points_the_model_numbers_at_the_client_numbers() -> None:
    text = "Sources:\n[1] alpha document text here.\n[2] bravo document text here.\n[3] charlie document text here.\n"
    group = find_groups(text)[0]
    order = [2, 0, 1]
    sent = splice(text, group, order)
    mapping = dict(citation_map(text, group, order).numbers)
    for model, client in mapping.items():
        shown = sent.split(f"[{model}] ", 1)[1].split("\n", 1)[0]
        assert text.split(f"[{client}] ", 1)[1].split("\n", 1)[0] == shown


def test_json_answer_chat_and_completion() -> None:
    rewriter = CitationRewriter([MAP])
    chat = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "It is [1]."}}], "u": 1.50}
    out = json.loads(rewriter.json(json.dumps(chat).encode()))
    assert out["choices"][0]["message"]["content"] == "It is [3]."
    assert out["u"] == 1.5 and out["id"] == "x"
    completion = {"choices": [{"index": 0, "text": "Per Document 3."}]}
    assert json.loads(rewriter.json(json.dumps(completion).encode()))["choices"][0]["text"] == "Per Document 2."
    assert rewriter.json(b"not json") == b"not json"


def _stream(pieces: list[str], finish: bool = True, end: bytes = b"\n\n") -> bytes:
    events = [
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": p}}]}
        for p in pieces
    ]
    if finish:
        events.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(b"data: " + msgspec.json.encode(e) + end for e in events) + b"data: [DONE]" + end


def _content(stream: bytes) -> str:
    out = []
    for event in stream.replace(b"\r\n", b"\n").split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in json.loads(event[6:])["choices"]:
                out.append(choice.get("delta", {}).get("content", ""))
    return "".join(out)


ANSWER = "The tower [1] is older than [2, 3]; Document 1 says so, and [Doc 2] too. Source 3 is silent [1]"


@settings(max_examples=150, deadline=None)
@given(
    cuts=st.lists(st.integers(0, len(ANSWER)), max_size=12),
    chunk=st.integers(1, 64),
    finish=st.booleans(),
    end=st.sampled_from([b"\n\n", b"\r\n\r\n"]),
    suffix=st.sampled_from(["", " see Document 2", " and [3"]),
)
def test_stream_cut_anywhere_maps_like_the_whole_text(
    cuts: list[int], chunk: int, finish: bool, end: bytes, suffix: str
) -> None:
    answer = ANSWER + suffix  # ends in a citation, mid-citation or not
    points = sorted({0, len(answer), *(cut for cut in cuts if cut < len(answer))})
    pieces = [answer[a:b] for a, b in pairwise(points)]
    raw = _stream(pieces, finish, end)
    rewriter = CitationRewriter([MAP])
    out = b"".join(rewriter.feed(raw[i : i + chunk]) for i in range(0, len(raw), chunk)) + rewriter.flush()
    assert _content(out) == CitationRewriter([MAP]).text(answer)
    assert out.endswith(b"data: [DONE]" + end)
    assert raw.count(end) <= out.count(end) <= raw.count(end) + 1  # held text is flushed in one event at most
    assert out.count(b"\n\n") == (0 if end != b"\n\n" else out.count(end))  # one line ending throughout


def test_stream_holds_back_only_a_possible_citation() -> None:
    rewriter = CitationRewriter([MAP])
    assert rewriter.split("The answer is clear [") == ("The answer is clear ", "[")
    assert rewriter.split("see Document 1") == ("see ", "Document 1")
    assert rewriter.split("see Docu") == ("see ", "Docu")
    assert rewriter.split("the tower is tall") == ("the tower is tall", "")
    assert rewriter.split("as [2] says") == ("as [2] says", "")


def test_a_stream_without_event_ends_is_not_held_forever() -> None:
    rewriter = CitationRewriter([MAP])
    assert rewriter.feed(b"x" * 1000) == b""
    assert rewriter.feed(b"y" * (1 << 20)) == b"x" * 1000 + b"y" * (1 << 20)
    assert rewriter.flush() == b""
