"""The narrow interface between an API's request walk and the planner, and what a walk returns.

An API module (``gateway.wire.anthropic``, ``gateway.wire.responses``) knows where the texts and the whole-block
units sit in its request body; the planner knows how to order them. The walk visits the body in prompt order and
hands every piece to a ``Walker``: ``feed`` for bytes that stay as they are, ``text`` for a text the planner may
rewrite (its groups found and spliced as in chat messages), ``read`` for a text that is never rewritten but may say
something about the blocks (an assistant turn citing "document 2"), ``units`` for a run of whole blocks (several
``document`` blocks) the planner may permute. ``text``, ``units`` and ``feed`` also feed what the engine will see
into the prefix key.

Meaning is decided from the whole request, as on the chat route, so the planner walks a body twice: first with a
``Reader`` that changes nothing and collects every text (``text`` and ``read`` alike, numbered in the order met),
then with a ``ScopedWalker`` that meets the same texts in the same order and plans each one with the cues of all
the others (the walk is deterministic: the ordinals of the two walks name the same texts).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

__all__ = [
    "AnswerRewriter",
    "AnswerStream",
    "Planned",
    "Reader",
    "ScopedWalker",
    "Walker",
    "as_list",
    "as_object",
    "as_text_or_list",
    "feed_other",
    "read_texts",
    "with_fields",
]


class Walker(Protocol):
    """What a request walk may ask of the planner. ``kind`` is the scope: ``system``, ``user`` or ``tool``."""

    def feed(self, data: bytes) -> None:
        """Bytes the engine sees here, left as they are."""

    def text(self, text: str, kind: str) -> str | None:
        """The text rewritten (block groups in it reordered), or None when it stays as it is."""

    def read(self, text: str) -> None:
        """A text never rewritten (the walk feeds its bytes itself), read for its references to blocks."""

    def units(self, units: Sequence[bytes], kind: str, form: str, first: int) -> tuple[int, ...] | None:
        """An order for whole blocks (position ``j`` sends ``units[order[j]]``), or None to keep theirs. ``form``:
        the blocks' type (``document``...); ``first``: how many blocks of that type the request holds before them."""


class AnswerStream(Protocol):
    """Rewrites a streamed answer event by event: ``feed`` returns the complete events so far, ``flush`` the rest."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class AnswerRewriter(Protocol):
    """Puts what the engine said about the blocks it was sent back in the client's terms (citation indices)."""

    def json(self, body: bytes) -> bytes: ...

    def stream(self) -> AnswerStream: ...


class Reader:
    """The first walk: changes nothing, collects every text met (``texts[i]``: the text, and whether it is in
    ``scope`` for finding groups); ``text`` and ``read`` calls alike count as text ``i``."""

    __slots__ = ("_scope", "texts")

    def __init__(self, scope: Container[str]) -> None:
        self._scope = scope
        self.texts: list[tuple[str, bool]] = []

    def feed(self, data: bytes) -> None:
        pass

    def text(self, text: str, kind: str) -> None:
        self.texts.append((text, kind in self._scope))

    def read(self, text: str) -> None:
        self.texts.append((text, False))

    def units(self, units: Sequence[bytes], kind: str, form: str, first: int) -> None:
        return None


class ScopedWalker:
    """A ``Walker`` over the planner's steps: texts and runs whose kind is out of ``scope`` are fed as they are.
    ``text`` is called with the text's ordinal (the same as in the ``Reader`` walk of the same body)."""

    __slots__ = ("_scope", "_seen", "_text", "_units", "feed")

    def __init__(
        self,
        feed: Callable[[bytes], None],
        text: Callable[[str, int], str | None],
        units: Callable[[Sequence[bytes], str, int], tuple[int, ...] | None],
        scope: Container[str],
    ) -> None:
        self.feed, self._text, self._units, self._scope = feed, text, units, scope
        self._seen = 0

    def text(self, text: str, kind: str) -> str | None:
        key = self._seen
        self._seen += 1
        if kind in self._scope:
            return self._text(text, key)
        self.feed(text.encode("utf-8", "surrogatepass"))
        return None

    def read(self, text: str) -> None:
        self._seen += 1

    def units(self, units: Sequence[bytes], kind: str, form: str, first: int) -> tuple[int, ...] | None:
        if kind in self._scope:
            return self._units(units, form, first)
        for unit in units:
            self.feed(unit)
        return None


@dataclass(slots=True)
class Planned:
    """A walk's outcome: top-level fields to replace, an answer rewriter, and why something was left alone."""

    fields: dict[str, Any] = field(default_factory=dict)
    answer: AnswerRewriter | None = None
    notes: list[str] = field(default_factory=list)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_object = msgspec.json.Decoder(dict[str, msgspec.Raw])
_list = msgspec.json.Decoder(list[msgspec.Raw])
_text_or_list = msgspec.json.Decoder(str | list[msgspec.Raw])


# Clients send anything: a walk reads a field through these and leaves what has an unexpected shape alone.
def as_object(raw: msgspec.Raw) -> dict[str, msgspec.Raw] | None:
    """The JSON object's fields (values raw), or None when it is not an object."""
    try:
        return _object.decode(raw)
    except msgspec.DecodeError:
        return None


def as_list(raw: msgspec.Raw) -> list[msgspec.Raw] | None:
    try:
        return _list.decode(raw)
    except msgspec.DecodeError:
        return None


def as_text_or_list(raw: msgspec.Raw) -> str | list[msgspec.Raw] | None:
    try:
        value: str | list[msgspec.Raw] = _text_or_list.decode(raw)
    except msgspec.DecodeError:
        return None
    return value


def feed_other(walker: Walker, obj: dict[str, msgspec.Raw], skip: str) -> None:
    """Feed every field of ``obj`` but ``skip`` (name and raw value), in the order sent."""
    for name, value in obj.items():
        if name != skip:
            walker.feed(name.encode() + b"=" + bytes(value))


def read_texts(walker: Walker, raw: msgspec.Raw) -> None:
    """``read`` the texts of a content that is never rewritten: a string, or the ``text`` of each block in a list."""
    value = as_text_or_list(raw)
    if isinstance(value, str):
        walker.read(value)
        return
    for item in value or ():
        block = as_object(item) or {}
        text = _decoder.decode(block["text"]) if "text" in block else None
        if isinstance(text, str):
            walker.read(text)


def with_fields(obj: dict[str, msgspec.Raw], fields: dict[str, Any]) -> msgspec.Raw:
    """The object with ``fields`` replaced; its other fields keep their exact bytes."""
    updated = dict(obj)
    for key, value in fields.items():
        updated[key] = msgspec.Raw(_encoder.encode(value))
    return msgspec.Raw(_encoder.encode(updated))
