"""Citation mapping (opt-in): the answer's citation numbers, rewritten back to the client's numbering.

With citation mapping on, a group whose prompt asks to cite by number is renumbered for the cache like any
other (:mod:`gateway.planning.intercept.meaning` decides ``map``), and the model cites the *new* numbers. The
:class:`CitationRewriter` turns them back into the client's: ``[2]`` -> ``[4]``, ``[2, 3]`` -> ``[4, 1]``,
``[Doc 2]``, ``Document 2``, ``Source #2``, in a JSON answer (``choices[].message.content`` / ``text``) and in
streamed deltas. A stream holds back only a tail that may still become a citation (``[``, ``[1``,
``Document``, ``Source 1``) until the next delta, the choice's ``finish_reason`` or ``[DONE]`` decides it.

Where it can be wrong is listed in docs/meaning.md, "Citation mapping": numbers that are not citations (``a[1]`` in
code, "Result 2 of 3"), ranges (``[1-3]``), bare numbers ("documents 1 and 3": only the first), logprobs
(left as the engine sent them), a content-encoded upstream answer (passed through unmapped).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.planning.intercept.groups import BlockGroup
from gateway.wire.sse import EventFrames

__all__ = ["CitationRewriter", "CitationMap", "citation_map"]

_WORDS = (
    "doc", "docs", "document", "documents", "source", "sources", "passage", "passages", "chunk", "chunks",
    "context", "contexts", "result", "results", "reference", "references", "excerpt", "excerpts", "snippet",
    "snippets", "article", "articles", "evidence", "ref", "refs", "citation", "citations",
)  # fmt: skip
_WORD = "|".join(sorted(_WORDS, key=len, reverse=True))
_CITATION = re.compile(
    rf"\[(?P<bw>(?:(?:{_WORD})[ \t]*#?[ \t]*)?)(?P<bn>\d{{1,4}}(?:[ \t]*[,;][ \t]*\d{{1,4}}){{0,20}})\]"
    rf"|\b(?P<ww>(?:{_WORD})[ \t]+(?:#[ \t]*)?)(?P<wn>\d{{1,4}})\b",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"\d+")
# a tail that may still grow into a citation: an open bracket, or a citation word (or its start) with its number
_OPEN = re.compile(rf"\[(?:(?:{_WORD})?[ \t]*#?[ \t]*(?:\d{{1,4}}(?:[ \t]*[,;][ \t]*\d{{0,4}}){{0,20}})?)?\Z", re.I)
_TAIL_WORD = re.compile(r"[A-Za-z]{1,11}(?:[ \t]+#?[ \t]*\d{0,4})?\Z")
_MAX_HOLD = 96
_raw_object = msgspec.json.Decoder(dict[str, msgspec.Raw])
_raw_list = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class CitationMap:
    """The numbers one renumbered group carries in the prompt (what the model cites) -> the client's."""

    numbers: tuple[tuple[int, int], ...]


def citation_map(text: str, group: BlockGroup, order: Sequence[int]) -> CitationMap:
    """The map of a group spliced in ``order``: position ``p`` shows ``base + p``, the client's ``base + order[p]``."""
    del text
    base = group.number_base if group.number_base is not None else 1
    return CitationMap(tuple((base + p, base + index) for p, index in enumerate(order) if p != index))


class CitationRewriter:
    """Rewrites one answer's citations; ``json`` for a whole body, ``feed``/``flush`` for an SSE stream."""

    def __init__(self, maps: Iterable[CitationMap]) -> None:
        self.numbers: dict[int, int] = {}
        for citation in maps:
            for model, client in citation.numbers:
                self.numbers.setdefault(model, client)
        self.rewritten = 0  # citations changed, for the result header of a later request and for tests
        self._frames = EventFrames()
        self._pending: dict[int, str] = {}
        self._last: dict[str, msgspec.Raw] = {}
        self._field = "content"
        self._end = b"\n\n"

    # text ----------------------------------------------------------------------------------------------------
    def text(self, value: str) -> str:
        """``value`` with every recognised citation number mapped back (one pass: nothing is mapped twice)."""
        return _CITATION.sub(self._citation, value)

    def _map(self, match: re.Match[str]) -> str:
        value = int(match.group())
        mapped = self.numbers.get(value, value)
        self.rewritten += mapped != value
        return str(mapped)

    def _citation(self, match: re.Match[str]) -> str:
        if match.group("bn") is not None:
            return f"[{match.group('bw')}{_NUMBER.sub(self._map, match.group('bn'))}]"
        return f"{match.group('ww')}{_NUMBER.sub(self._map, match.group('wn'))}"

    def split(self, value: str) -> tuple[str, str]:
        """``(ready, held)``: the held tail is the shortest one that may still become a citation."""
        hold = len(value)
        for pattern in (_OPEN, _TAIL_WORD):
            match = pattern.search(value, max(0, len(value) - _MAX_HOLD))
            if match is not None and (pattern is _OPEN or _could_cite(match.group())):
                hold = min(hold, match.start())
        return value[:hold], value[hold:]

    # JSON ----------------------------------------------------------------------------------------------------
    def json(self, body: bytes) -> bytes:
        """A whole chat or completion answer with its choices' text mapped; anything unexpected passes."""
        if (decoded := _with_choices(body)) is None:
            return body
        top, choices = decoded
        for choice in choices:
            if "message" in choice:
                message = _raw_object.decode(choice["message"])
                content = msgspec.json.decode(message.get("content", b"null"))
                if isinstance(content, str):
                    message["content"] = msgspec.Raw(_encoder.encode(self.text(content)))
                    choice["message"] = msgspec.Raw(_encoder.encode(message))
            elif isinstance(text := msgspec.json.decode(choice.get("text", b"null")), str):
                choice["text"] = msgspec.Raw(_encoder.encode(self.text(text)))
        top["choices"] = msgspec.Raw(_encoder.encode(choices))
        return _encoder.encode(top)

    # SSE -----------------------------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        """Relay-ready bytes for the complete events so far; an incomplete event waits for its end.

        Framed by ``gateway.wire.sse.EventFrames``: each event keeps its own line endings, and one over 1 MiB is
        relayed unmapped as it arrives rather than held.
        """
        out: list[bytes] = []
        for event, end in self._frames.feed(chunk):
            if end is None:
                out.append(event)
            else:
                self._end = end  # a synthesised event ends like the stream's own
                out.append(self._event(event) + end)
        return out[0] if len(out) == 1 else b"".join(out)

    def stream(self) -> CitationRewriter:
        """The rewriter of one streamed answer (``gateway.wire.AnswerStream``): this one, it holds one answer."""
        return self

    def flush(self) -> bytes:
        """What is still held when the stream ends without ``[DONE]``."""
        rest = self._frames.rest()
        return self._flush() + rest

    def _event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        for at, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return self._flush() + event
            lines[at] = b"data: " + self._chunk(payload) + (b"\r" if line.endswith(b"\r") else b"")
        return b"\n".join(lines)

    def _chunk(self, payload: bytes) -> bytes:
        if (decoded := _with_choices(payload)) is None:
            return payload
        top, choices = decoded
        self._last = top
        for choice in choices:
            index = msgspec.json.decode(choice.get("index", b"0"))
            finished = msgspec.json.decode(choice.get("finish_reason", b"null")) is not None
            holder: dict[str, msgspec.Raw] | None = None
            if "delta" in choice:
                holder, self._field = _raw_object.decode(choice["delta"]), "content"
            elif "text" in choice:
                holder, self._field = choice, "text"
            if holder is None or not isinstance(index, int):
                continue
            piece = msgspec.json.decode(holder.get(self._field, b"null"))
            if not isinstance(piece, str) and not (finished and self._pending.get(index)):
                continue
            ready, held = self.split(self._pending.pop(index, "") + (piece or ""))
            if finished:
                ready, held = ready + held, ""
            if held:
                self._pending[index] = held
            holder[self._field] = msgspec.Raw(_encoder.encode(self.text(ready)))
            if holder is not choice:
                choice["delta"] = msgspec.Raw(_encoder.encode(holder))
        top["choices"] = msgspec.Raw(_encoder.encode(choices))
        return _encoder.encode(top)

    def _flush(self) -> bytes:
        """One synthesised chunk carrying every held tail (a stream that ended without a finish_reason)."""
        if not any(self._pending.values()):
            return b""
        choices: list[dict[str, Any]] = []
        for index, held in sorted(self._pending.items()):
            text = self.text(held)
            choices.append({"index": index, "delta": {"content": text}} if self._field == "content" else
                           {"index": index, "text": text})  # fmt: skip
        self._pending.clear()
        top = {key: value for key, value in self._last.items() if key in ("id", "object", "created", "model")}
        top["choices"] = msgspec.Raw(_encoder.encode(choices))
        return b"data: " + _encoder.encode(top) + self._end


def _could_cite(tail: str) -> bool:
    """Whether a trailing word (with a number after it) may still grow into a citation word and number."""
    word = tail.split(maxsplit=1)[0].lower() if tail.split() else ""
    if len(tail.split()) > 1 or tail != tail.rstrip(" \t") or tail[len(word) :].strip():
        return word in _WORDS
    return any(candidate.startswith(word) for candidate in _WORDS)


def _with_choices(payload: bytes) -> tuple[dict[str, msgspec.Raw], list[dict[str, msgspec.Raw]]] | None:
    """An answer's (or a chunk's) top object and its choices, their values undecoded; None for anything else."""
    try:
        top = _raw_object.decode(payload)
        return top, _raw_list.decode(top["choices"])
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
        return None
