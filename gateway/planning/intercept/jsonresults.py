"""JSON tool results whose ``results`` / ``documents`` / ``sources`` / ``data`` key holds an array of objects.

The whole text must be one JSON object (surrounding whitespace allowed). The top level is walked by hand and
every value is handed to the C decoder (``JSONDecoder.raw_decode`` at an offset), which returns where the
value ends; so element boundaries are exact source spans, the walk is linear, and the whole text is validated
on the way (any error means no group). The blocks are the elements' exact bytes and the gaps (``,`` plus
whatever whitespace the producer wrote) stay in place: after a splice the text is byte-identical apart from
element order and is still valid JSON with every other key intact.

Only top-level keys are considered; an array counts when it holds at least two elements, all objects, and
its key appears once. An explicit ``json_results`` mode also accepts a top-level array of objects. Numbers
inside elements (``"rank": 1``) are left as they are.
"""

from __future__ import annotations

import json
import re

from gateway.planning.intercept.groups import Block, BlockGroup

__all__ = ["RESULT_KEYS", "find_json_groups"]

RESULT_KEYS = ("results", "documents", "sources", "data")
_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


class _Invalid(Exception):
    """The text is not the JSON this module handles."""


def _skip(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match is not None else pos


def _expect(text: str, pos: int, char: str) -> int:
    if text.startswith(char, pos):
        return _skip(text, pos + 1)
    raise _Invalid


def _value(text: str, pos: int) -> tuple[object, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError) as exc:
        raise _Invalid from exc


def _array(text: str, pos: int) -> tuple[list[tuple[int, int]] | None, int]:
    """Walk the array at ``text[pos] == "["``; return its elements' spans (``None`` unless all are objects)."""
    spans: list[tuple[int, int]] | None = []
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        return spans, pos + 1
    while True:
        value, end = _value(text, pos)
        if spans is not None and isinstance(value, dict):
            spans.append((pos, end))
        else:
            spans = None
        pos = _skip(text, end)
        if text.startswith("]", pos):
            return spans, pos + 1
        pos = _expect(text, pos, ",")


def _object(text: str, pos: int) -> dict[str, list[tuple[int, int]] | None]:
    """Walk the top-level object at ``pos``; return the qualifying arrays by key (``None`` if disqualified)."""
    arrays: dict[str, list[tuple[int, int]] | None] = {}
    seen: set[str] = set()
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        return arrays
    while True:
        if not text.startswith('"', pos):
            raise _Invalid
        key, pos = _value(text, pos)
        pos = _expect(text, _skip(text, pos), ":")
        if key in RESULT_KEYS and text.startswith("[", pos):
            spans, pos = _array(text, pos)
        else:
            spans, pos = None, _value(text, pos)[1]
        if isinstance(key, str):
            arrays[key] = None if key in seen else spans
            seen.add(key)
        pos = _skip(text, pos)
        if text.startswith("}", pos):
            if _skip(text, pos + 1) != len(text):
                raise _Invalid
            return arrays
        pos = _expect(text, pos, ",")


def _group(label: str, spans: list[tuple[int, int]]) -> BlockGroup:
    return BlockGroup("json_results", label, tuple(Block(s, e, s, e) for s, e in spans), None, None)


def _top_array(text: str, pos: int) -> list[BlockGroup]:
    spans, end = _array(text, pos)
    if _skip(text, end) != len(text) or spans is None or len(spans) < 2:
        return []
    return [_group("", spans)]


def find_json_groups(text: str, strict: bool = True) -> list[BlockGroup]:
    """Return the result arrays of a JSON object text, one group per qualifying key, in text order."""
    pos = _skip(text, 0)
    opening = text[pos : pos + 1]
    if opening != "{" and (strict or opening != "["):
        return []
    try:
        if opening == "[":
            return _top_array(text, pos)
        arrays = _object(text, pos)
    except _Invalid:
        return []
    groups = [_group(key, spans) for key, spans in arrays.items() if spans is not None and len(spans) >= 2]
    groups.sort(key=lambda group: group.start)
    return groups
