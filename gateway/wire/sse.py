"""Server-sent events framing: the one splitter of an upstream's event stream into whole events.

Every reader of a relayed stream frames it here: the usage reader (``gateway.proxy.usage``), Anthropic citation
indices (``gateway.wire.citations``) and chat citation numbers (``gateway.planning.citemap``). An event ends with a
blank line: two line ends in a row, each LF, CRLF or CR (``\\n\\n``, ``\\r\\n\\r\\n``, ``\\n\\r\\n``, ``\\r\\n\\n``,
``\\r\\r``); each event comes out with the exact bytes that ended it, so a reader that rewrites an event keeps the
stream's own line ends.

Bounded in memory and CPU: every byte is scanned once (a chunk is searched from the last 3 bytes before it, where an
end may have begun), an unfinished event is held as its chunks (joined once, when it ends), and an event still open
past ``limit`` bytes (1 MiB, as the OpenAI citation rewriter always held) is not held at all: its bytes come out as
they arrive, marked pass-through, until it ends, and ``oversized`` counts it. A stream that never sends a blank line
therefore costs the gateway at most ``limit`` bytes and one scan of what it sent.
"""

from __future__ import annotations

import re

__all__ = ["MAX_EVENT_BYTES", "EventFrames", "Frame"]

MAX_EVENT_BYTES = 1 << 20
_EVENT_END = re.compile(rb"\r?\n\r?\n|\r\r")
_END_SPAN = 3  # an end is at most 4 bytes: one begun before a chunk has at most 3 of them there

# (event, end): a whole event (without its end) and the blank line that ended it; (bytes, None): bytes of an event
# over the limit, to pass on unchanged as they are
Frame = tuple[bytes, bytes | None]


class EventFrames:
    """Splits one SSE byte stream into whole events as chunks arrive."""

    __slots__ = ("_limit", "_parts", "_size", "_skipping", "_tail", "oversized")

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._limit = limit
        self._parts: list[bytes] = []  # the unfinished event, as it came
        self._size = 0
        self._tail = b""  # the last bytes held (or passed on, while skipping): where an end may have begun
        self._skipping = False  # inside an event over the limit: passed on until its end
        self.oversized = 0  # events over the limit, passed on unread

    def feed(self, chunk: bytes) -> list[Frame]:
        """The frames ``chunk`` completes: whole events, or pass-through bytes of one over the limit."""
        # whole LF events, the common read (``13 not in``: ``b"\r" in`` first tries the needle as an int, ~10x slower)
        if not self._parts and not self._skipping and 13 not in chunk:
            *events, rest = chunk.split(b"\n\n")
            frames: list[Frame] = [(event, b"\n\n") for event in events]
            if rest:
                self._hold(rest, frames)
            return frames
        frames = []
        if self._skipping:
            chunk = self._skip(chunk, frames)
        elif self._parts:
            chunk = self._finish(chunk, frames)
        if chunk:
            self._split(chunk, frames)
        return frames

    def rest(self) -> bytes:
        """The unfinished event held when the stream ends (its bytes as they came), and forget it."""
        rest = b"".join(self._parts)
        self._parts, self._size, self._tail = [], 0, b""
        return rest

    def _split(self, data: bytes, frames: list[Frame]) -> None:
        """Frame ``data``, which starts an event; hold (or pass on) its unfinished last event."""
        if 13 not in data:  # LF line ends, as vLLM, SGLang and llama.cpp write them: split in C, not by regex
            *events, rest = data.split(b"\n\n")
            frames += [(event, b"\n\n") for event in events]
        else:
            position = 0
            for match in _EVENT_END.finditer(data):
                frames.append((data[position : match.start()], match.group()))
                position = match.end()
            rest = data[position:] if position else data
        if rest:
            self._hold(rest, frames)

    def _finish(self, chunk: bytes, frames: list[Frame]) -> bytes:
        """Look for the end of the held event in ``chunk``; return what follows it (b"" when it has not ended)."""
        tail = self._tail
        found = _find_end(tail + chunk)
        if found is None:
            self._hold(chunk, frames)
            return b""
        at, ending = found
        start, end = at - len(tail), at + len(ending) - len(tail)
        held = b"".join(self._parts)
        event = held + chunk[:start] if start >= 0 else held[: len(held) + start]
        frames.append((event, ending))
        self._parts, self._size, self._tail = [], 0, b""
        return chunk[end:]

    def _hold(self, data: bytes, frames: list[Frame]) -> None:
        self._parts.append(data)
        self._size += len(data)
        self._tail = (self._tail + data)[-_END_SPAN:]
        if self._size > self._limit:  # not held any longer: what came passes on, the rest as it arrives
            self.oversized += 1
            frames.append((b"".join(self._parts), None))
            self._parts, self._size, self._skipping = [], 0, True

    def _skip(self, chunk: bytes, frames: list[Frame]) -> bytes:
        """Pass ``chunk`` on up to the end of the event over the limit; return what follows it."""
        tail = self._tail
        found = _find_end(tail + chunk)
        if found is None:
            self._tail = (tail + chunk)[-_END_SPAN:]
            if chunk:
                frames.append((chunk, None))
            return b""
        end = found[0] + len(found[1]) - len(tail)
        if end > 0:
            frames.append((chunk[:end], None))
        self._skipping, self._tail = False, b""
        return chunk[end:]


def _find_end(data: bytes) -> tuple[int, bytes] | None:
    """Where the first event end in ``data`` starts, and its bytes."""
    if 13 not in data:
        at = data.find(b"\n\n")
        return None if at < 0 else (at, b"\n\n")
    match = _EVENT_END.search(data)
    return None if match is None else (match.start(), match.group())
