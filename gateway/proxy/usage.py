"""Engine-reported usage in upstream answers: whole JSON bodies, and server-sent events as they are relayed."""

from __future__ import annotations

from typing import Any

import msgspec

from engines.base import cached_tokens_from_usage
from gateway.wire.sse import EventFrames

__all__ = ["UsageSniffer", "decode_answer"]


class UsageSniffer:
    """Watches relayed SSE bytes for the chunk carrying ``usage`` (or llama.cpp's ``timings``) without holding the
    stream. Framed by ``gateway.wire.sse.EventFrames``: each byte is scanned once, an unfinished event is held up to
    1 MiB (a Responses stream's last event carries the whole response, output text included, before its usage) and
    an event over that is passed over unread (``oversized``)."""

    __slots__ = ("_frames", "usage")

    def __init__(self) -> None:
        self._frames = EventFrames()
        self.usage: dict[str, Any] | None = None  # the last chunk that reported cached tokens

    @property
    def oversized(self) -> int:
        """Events over the framing limit, passed on unread."""
        return self._frames.oversized

    def feed(self, chunk: bytes) -> None:
        for event, end in self._frames.feed(chunk):
            if end is None or (event.find(b'"usage"') < 0 and event.find(b'"timings"') < 0):
                continue
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    self._read(line[5:].strip())

    def _read(self, data: bytes) -> None:
        payload = decode_answer(data)
        if isinstance(payload, dict) and cached_tokens_from_usage(payload) is not None:
            self.usage = payload


def decode_answer(body: bytes) -> Any:
    """An upstream JSON answer, or None when it is not valid JSON (or nests deeper than msgspec follows)."""
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
