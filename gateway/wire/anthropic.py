"""The Anthropic Messages API (``POST /v1/messages``): where its blocks are, and its error shapes.

Texts planned like chat messages (block groups found and spliced): ``system`` (a string or ``text`` blocks), user
``text`` blocks and string contents, ``tool_result`` contents (a string or ``text`` blocks), and the text of a single
``document`` (a ``text`` source's ``data``, a ``content`` source's string or ``text`` blocks) or ``search_result``
(its ``text`` blocks) whose citations are off. Whole blocks permuted: a run of two or more consecutive ``document``
blocks, or of ``search_result`` blocks, in one message or one tool result. A block with ``cache_control`` never
moves and ends a run, so each cache breakpoint still covers the same set of blocks. Assistant messages are never
touched. Only the fields that change are re-encoded (``msgspec.Raw`` everywhere else): ``cache_control``,
``citations`` settings, images, titles and unknown fields keep their bytes.

Meaning: every text of the request is read first, assistant turns included (see ``gateway.wire.walk``), and a
run of whole blocks moves only when nothing refers to its blocks by position ("the second document", "document
3", "[2]"), asks to cite by number in the text, or calls their order meaningful (ranked, chronological, or blocks
dated in order): see ``gateway.planning.units``. The model's own structured citations need no such care:

Citations name blocks by position, so moved blocks get a ``BlockPositions`` that puts the answer's indices back in
the client's order (every answer, whether or not citations were asked for). Citations the client sends back (an
earlier answer resent in an assistant turn) are mapped the other way, to the positions the engine is sent, so a
conversation keeps its documents in one order turn after turn and every index names the block it meant.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import GatewayError, read_upstream_error
from gateway.wire.citations import BlockPositions
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

__all__ = ["MessagesView", "error_body", "normalize_upstream_error", "plan", "stream_error"]

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_UNITS = ("document", "search_result")


class Message(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]]


class MessagesView(msgspec.Struct):
    """What the proxy checks of a Messages request; the rest travels as raw bytes."""

    messages: list[Message]
    model: str | None = None
    stream: bool | None = None
    system: str | list[dict[str, Any]] | None = None


def plan(top: dict[str, msgspec.Raw], body: bytes, walker: Walker) -> Planned:
    """Walk a Messages body in prompt order; return the fields to replace and the citation map."""
    walk = _Walk(walker)
    planned = Planned()
    if "system" in top:
        new_system = _text_field(walker, top["system"], "system", walk)
        if new_system is not None:
            planned.fields["system"] = new_system
    messages = as_list(top["messages"]) or []
    changed = False
    for i, raw in enumerate(messages):
        message = as_object(raw) or {}
        role = _decoder.decode(message["role"]) if "role" in message else None
        if role != "user" or "content" not in message:
            if "content" in message:
                read_texts(walker, message["content"])  # an earlier answer may name a document by number
            walker.feed(bytes(raw))
            continue
        feed_other(walker, message, "content")
        new = _text_field(walker, message["content"], "user", walk)
        if new is not None:
            messages[i] = with_fields(message, {"content": new})
            changed = True
    if any(walk.maps.values()):
        answer = BlockPositions(walk.maps["document"], walk.maps["search_result"])
        planned.answer = answer
        if b"_index" in body:
            changed |= _resent_citations(messages, answer.inverse())
    if changed:
        planned.fields["messages"] = messages
    return planned


def _resent_citations(messages: list[msgspec.Raw], to_sent: BlockPositions) -> bool:
    """Citations the client sends back (an earlier answer in an assistant turn) name blocks by the client's
    positions; rewrite them to the positions sent, as the engine itself wrote them."""
    changed = False
    for i, raw in enumerate(messages):
        if b"_index" not in bytes(raw):
            continue
        message = as_object(raw) or {}
        content = _decoder.decode(message["content"]) if "content" in message else None
        if to_sent.remap_blocks(content):
            messages[i] = with_fields(message, {"content": content})
            changed = True
    return changed


class _Walk:
    """State across the whole request: block counters (citation positions) and where moved blocks went."""

    def __init__(self, walker: Walker) -> None:
        self.walker = walker
        self.counts = dict.fromkeys(_UNITS, 0)
        self.maps: dict[str, dict[int, int]] = {kind: {} for kind in _UNITS}

    def blocks(self, raws: list[msgspec.Raw], kind: str) -> list[msgspec.Raw] | None:
        """Plan one content array; the new array, or None when it stays as it is."""
        out = list(raws)
        decoded = [as_object(raw) or {} for raw in raws]
        types = [_decoder.decode(block["type"]) if "type" in block else None for block in decoded]
        changed = False
        i = 0
        while i < len(raws):
            end = i
            while end < len(raws) and types[end] in _UNITS and types[end] == types[i] and _movable(decoded[end]):
                end += 1
            if end - i >= 2:
                changed |= self._run(raws, (i, end), types[i], kind, out)
                i = end
                continue
            new = self._block(decoded[i], types[i], kind, raws[i])
            if new is not None:
                out[i] = new
                changed = True
            i += 1
        return out if changed else None

    def _run(
        self, raws: list[msgspec.Raw], span: tuple[int, int], unit: Any, kind: str, out: list[msgspec.Raw]
    ) -> bool:
        start, end = span
        base = self.counts[unit]
        self.counts[unit] += end - start
        order = self.walker.units([bytes(raw) for raw in raws[start:end]], kind, unit, base)
        if order is None:
            return False
        out[start:end] = [raws[start + index] for index in order]
        for slot, index in enumerate(order):
            if slot != index:
                self.maps[unit][base + slot] = base + index
        return True

    def _block(self, block: dict[str, msgspec.Raw], type_: Any, kind: str, raw: msgspec.Raw) -> msgspec.Raw | None:
        walker = self.walker
        if type_ in _UNITS:
            self.counts[type_] += 1
        if type_ == "text" and "text" in block:
            feed_other(walker, block, "text")
            text = _decoder.decode(block["text"])
            new = walker.text(text, kind) if isinstance(text, str) else None
            return with_fields(block, {"text": new}) if new is not None else None
        if type_ == "tool_result" and "content" in block:
            feed_other(walker, block, "content")
            new_content = _text_field(walker, block["content"], "tool", self)
            return with_fields(block, {"content": new_content}) if new_content is not None else None
        if type_ == "search_result" and "content" in block and not _citations_on(block):
            feed_other(walker, block, "content")  # its citations would point at content blocks by position
            new_results = _text_field(walker, block["content"], kind, self)
            return with_fields(block, {"content": new_results}) if new_results is not None else None
        source = as_object(block["source"]) if type_ == "document" and "source" in block else None
        if source is not None and not _citations_on(block):
            feed_other(walker, block, "source")
            new_source = self._document_source(source, kind)
            return with_fields(block, {"source": new_source}) if new_source is not None else None
        walker.feed(bytes(raw))
        return None

    def _document_source(self, source: dict[str, msgspec.Raw], kind: str) -> msgspec.Raw | None:
        source_type = _decoder.decode(source["type"]) if "type" in source else None
        field = {"text": "data", "content": "content"}.get(source_type) if isinstance(source_type, str) else None
        if field is None or field not in source:
            self.walker.feed(_encoder.encode(source))
            return None
        feed_other(self.walker, source, field)
        new = _text_field(self.walker, source[field], kind, self)
        return with_fields(source, {field: new}) if new is not None else None


def _text_field(walker: Walker, raw: msgspec.Raw, kind: str, walk: _Walk) -> Any:
    """A string or a block array (``system``, ``content``): its replacement, or None when unchanged."""
    value = as_text_or_list(raw)
    if isinstance(value, str):
        return walker.text(value, kind)
    if isinstance(value, list):
        return walk.blocks(value, kind)
    walker.feed(bytes(raw))
    return None


def _movable(block: dict[str, msgspec.Raw]) -> bool:
    raw = block.get("cache_control")
    return raw is None or bytes(raw) == b"null"


def _citations_on(block: dict[str, msgspec.Raw]) -> bool:
    raw = block.get("citations")
    if raw is None:
        return False
    value = _decoder.decode(raw)
    return isinstance(value, dict) and value.get("enabled") is True


# Anthropic's error types by status; the SDK maps the status, clients read ``error.type``.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(exc: GatewayError) -> bytes:
    """``{"type": "error", "error": {"type", "message"}}``, as the Messages API answers errors."""
    return _envelope(exc.status, exc.message)


def _envelope(status: int, message: str) -> bytes:
    type_ = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return _encoder.encode({"type": "error", "error": {"type": type_, "message": message}})


def stream_error(exc: GatewayError) -> bytes:
    """The SSE ``error`` event that ends a stream the upstream broke off."""
    return b"event: error\ndata: " + error_body(exc) + b"\n\n"


def normalize_upstream_error(status: int, body: bytes) -> bytes | None:
    """An Anthropic envelope for an upstream error that is not one (None: relay it as it is)."""
    decoded, message, _, _ = read_upstream_error(status, body)
    inner = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(inner, dict) and decoded.get("type") == "error" and "message" in inner:
        return None
    return _envelope(status, message)
