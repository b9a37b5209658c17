"""Engine-reported usage in upstream answers: whole JSON bodies, and server-sent events as they are relayed."""

from __future__ import annotations

from typing import Any

import msgspec

from engines.base import cached_tokens_from_usage

__all__ = ["UsageSniffer", "decode_answer"]


class UsageSniffer:
    """Watches relayed SSE bytes for the chunk carrying ``usage`` without holding the stream.

    Events end with a blank line; lines end with LF or CRLF (normalised to LF before splitting).
    """

    __slots__ = ("_pending", "usage")

    def __init__(self) -> None:
        self._pending = b""
        self.usage: dict[str, Any] | None = None  # the last chunk that reported cached tokens

    def feed(self, chunk: bytes) -> None:
        data = (self._pending + chunk).replace(b"\r\n", b"\n")
        events = data.split(b"\n\n")
        # a trailing CR may be the first half of a CRLF split across chunks: it stays pending, as it is
        # a Responses stream's last event carries the whole response (output text included) before its usage
        self._pending = events.pop()[-(1 << 20) :]
        for event in events:
            if b'"usage"' not in event and b'"timings"' not in event:
                continue
            for line in event.split(b"\n"):
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
