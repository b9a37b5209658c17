"""Anthropic citations point at blocks by position: put them back in the client's order.

A citation names its source by ``document_index`` (0-based among every ``document`` block of the request, in the
order they appear across messages and tool results) or ``search_result_index`` (the same for ``search_result``
blocks). When the gateway sends those blocks in another order, the engine's indices are positions in what it was
sent; ``BlockPositions`` turns them back into positions in what the client sent, in a whole answer (``json``) and in
a stream (``stream``: ``content_block_start`` and ``content_block_delta``/``citations_delta`` events are rewritten,
every other event passes through byte for byte as soon as it is complete, and an event over 1 MiB passes through
unread as it arrives).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.wire.sse import EventFrames

__all__ = ["BlockPositions", "CitationStream"]

_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_FIELDS = (("document_index", "documents"), ("search_result_index", "search_results"))


@dataclass(frozen=True, slots=True)
class BlockPositions:
    """Sent position -> client position, per kind of block; positions not listed did not move."""

    documents: Mapping[int, int]
    search_results: Mapping[int, int]

    def remap(self, citation: Any) -> bool:
        """Rewrite one citation object in place; True when it changed."""
        if not isinstance(citation, dict):
            return False
        changed = False
        for name, kind in _FIELDS:
            value = citation.get(name)
            if type(value) is int:
                mapped = getattr(self, kind).get(value, value)
                if mapped != value:
                    citation[name] = mapped
                    changed = True
        return changed

    def inverse(self) -> BlockPositions:
        """Client position -> sent position."""
        return BlockPositions(
            {client: sent for sent, client in self.documents.items()},
            {client: sent for sent, client in self.search_results.items()},
        )

    def remap_blocks(self, blocks: Any) -> bool:
        """Rewrite the citations of a list of content blocks in place; True when any changed."""
        changed = False
        if isinstance(blocks, list):
            for block in blocks:
                if isinstance(block, dict) and isinstance(block.get("citations"), list):
                    for citation in block["citations"]:
                        changed |= self.remap(citation)
        return changed

    def json(self, body: bytes) -> bytes:
        """A whole ``message`` answer: its ``content`` blocks' citations remapped, every other field kept as is."""
        try:
            top = _raw_top.decode(body)
            content = _decoder.decode(top["content"]) if "content" in top else None
        except (msgspec.DecodeError, RecursionError):
            return body
        if not self.remap_blocks(content):
            return body
        top["content"] = msgspec.Raw(_encoder.encode(content))
        return _encoder.encode(top)

    def event(self, data: bytes) -> bytes | None:
        """One SSE ``data`` payload rewritten, or None when it needs no change."""
        if b"citation" not in data:
            return None
        try:
            payload = _decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):
            return None
        if not isinstance(payload, dict):
            return None
        changed = False
        kind = payload.get("type")
        if kind == "content_block_delta" and isinstance(payload.get("delta"), dict):
            changed = self.remap(payload["delta"].get("citation"))
        elif kind == "content_block_start":
            changed = self.remap_blocks([payload.get("content_block")])
        elif kind == "message_start" and isinstance(payload.get("message"), dict):
            changed = self.remap_blocks(payload["message"].get("content"))
        return _encoder.encode(payload) if changed else None

    def stream(self) -> CitationStream:
        return CitationStream(self)


class CitationStream:
    """Rewrites an SSE byte stream event by event (framed by ``gateway.wire.sse.EventFrames``): holds at most one
    incomplete event of up to 1 MiB; an event over that passes on unchanged as it arrives."""

    __slots__ = ("_frames", "_map")

    def __init__(self, citation_map: BlockPositions) -> None:
        self._map = citation_map
        self._frames = EventFrames()

    def feed(self, chunk: bytes) -> bytes:
        out = [event if end is None else self._event(event) + end for event, end in self._frames.feed(chunk)]
        return out[0] if len(out) == 1 else b"".join(out)

    def flush(self) -> bytes:
        rest = self._frames.rest()
        return self._event(rest) if rest else b""

    def _event(self, event: bytes) -> bytes:
        if b"citation" not in event:
            return event
        lines = event.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.startswith(b"data:"):
                body = line[5:].strip()
                rewritten = self._map.event(body)
                if rewritten is not None:
                    ending = line[len(line.rstrip(b"\r\n")) :]
                    lines[i] = b"data: " + rewritten + ending
        return b"".join(lines)
