"""The OpenAI Responses API (``POST /v1/responses``): where its blocks are, and its error shapes.

Texts planned like chat messages: ``instructions``, ``input`` as a string, ``input_text`` parts and string contents
of ``system``/``developer``/``user`` message items, and ``function_call_output`` outputs (a string or ``input_text``
parts: tool results). Whole blocks permuted: the ``results`` of a ``file_search_call`` item (each result is a unit;
answers cite files by id, not by position; a run moves only when no text of the request refers to a result by
position or number, nor calls the order meaningful: ``gateway.planning.units``). Assistant items are read for such
references (every text is read first, see ``gateway.wire.walk``); they, function calls, reasoning and unknown
items pass as they are; only changed fields are re-encoded.

A request with ``previous_response_id`` continues a conversation the engine stored: what precedes the new input is
not in the request, so no prefix key can describe it. Such requests are left alone, and the result header says so.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import GatewayError
from gateway.wire.walk import (
    Planned,
    Walker,
    as_list,
    as_object,
    as_text_or_list,
    feed_other,
    read_texts,
    with_fields,
)

__all__ = ["ResponsesView", "plan", "stream_error"]

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_KINDS = {"system": "system", "developer": "system", "user": "user"}


class ResponsesView(msgspec.Struct):
    """What the proxy checks of a Responses request; the rest travels as raw bytes."""

    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    model: str | None = None
    stream: bool | None = None
    previous_response_id: str | None = None


def plan(top: dict[str, msgspec.Raw], body: bytes, walker: Walker) -> Planned:
    """Walk a Responses body in prompt order; return the fields to replace."""
    planned = Planned()
    previous = top.get("previous_response_id")
    if previous is not None and bytes(previous) != b"null":
        planned.notes.append("previous_response_id")
        return planned
    instructions = _decoder.decode(top["instructions"]) if "instructions" in top else None
    if isinstance(instructions, str):
        new = walker.text(instructions, "system")
        if new is not None:
            planned.fields["instructions"] = new
    if "input" not in top:
        return planned
    value = as_text_or_list(top["input"])
    if isinstance(value, str):
        new = walker.text(value, "user")
        if new is not None:
            planned.fields["input"] = new
        return planned
    items = value or []
    changed = False
    results = [0]  # file-search results met so far: a run's position among them
    for i, raw in enumerate(items):
        replacement = _item(walker, raw, results)
        if replacement is not None:
            items[i] = replacement
            changed = True
    if changed:
        planned.fields["input"] = items
    return planned


def _item(walker: Walker, raw: msgspec.Raw, results: list[int]) -> msgspec.Raw | None:
    item = as_object(raw) or {}
    type_ = _decoder.decode(item["type"]) if "type" in item else "message"
    role = _decoder.decode(item["role"]) if "role" in item else None
    field, kind = None, None
    if type_ == "message" and isinstance(role, str) and role in _KINDS:
        field, kind = "content", _KINDS[role]
    elif type_ == "function_call_output":
        field, kind = "output", "tool"
    elif type_ == "file_search_call" and "results" in item:
        return _file_search(walker, item, results)
    if field is None or kind is None or field not in item:
        if type_ == "message" and "content" in item:
            read_texts(walker, item["content"])  # an assistant's earlier answer may name "result [2]"
        walker.feed(bytes(raw))
        return None
    feed_other(walker, item, field)
    value = as_text_or_list(item[field])
    if isinstance(value, str):
        new = walker.text(value, kind)
        return with_fields(item, {field: new}) if new is not None else None
    if not isinstance(value, list):
        walker.feed(bytes(item[field]))
        return None
    parts = list(value)
    changed = False
    for j, part_raw in enumerate(value):
        part = as_object(part_raw) or {}
        text = _decoder.decode(part["text"]) if "text" in part else None
        part_type = _decoder.decode(part["type"]) if "type" in part else None
        if part_type != "input_text" or not isinstance(text, str):
            walker.feed(bytes(part_raw))
            continue
        feed_other(walker, part, "text")
        new = walker.text(text, kind)
        if new is not None:
            parts[j] = with_fields(part, {"text": new})
            changed = True
    return with_fields(item, {field: parts}) if changed else None


def _file_search(walker: Walker, item: dict[str, msgspec.Raw], seen: list[int]) -> msgspec.Raw | None:
    feed_other(walker, item, "results")
    results = as_list(item["results"]) or []
    first = seen[0]
    seen[0] += len(results)
    if len(results) < 2:
        walker.feed(bytes(item["results"]))
        return None
    order = walker.units([bytes(result) for result in results], "tool", "file_search_result", first)
    if order is None:
        return None
    return with_fields(item, {"results": [results[index] for index in order]})


def stream_error(exc: GatewayError) -> bytes:
    """The SSE ``error`` event (Responses streaming shape) that ends a stream the upstream broke off."""
    payload = {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param}
    return b"event: error\ndata: " + _encoder.encode(payload) + b"\n\n"
