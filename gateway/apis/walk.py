"""The narrow interface between an API's request walk and the planner, and what a walk returns.

An API module (``gateway.apis.anthropic``, ``gateway.apis.responses``) knows where the texts and the whole-block
units sit in its request body; the planner knows how to order them. The walk visits the body in prompt order and
hands every piece to a ``Walker``: ``feed`` for bytes that stay as they are, ``text`` for a text the planner may
rewrite (its groups found and spliced as in chat messages), ``units`` for a run of whole blocks (several
``document`` blocks) the planner may permute. Each call also feeds what the engine will see into the prefix key.
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
    "ScopedWalker",
    "Walker",
    "as_list",
    "as_object",
    "as_text_or_list",
    "feed_other",
    "with_fields",
]


class Walker(Protocol):
    """What a request walk may ask of the planner. ``kind`` is the scope: ``system``, ``user`` or ``tool``."""

    def feed(self, data: bytes) -> None:
        """Bytes the engine sees here, left as they are."""

    def text(self, text: str, kind: str) -> str | None:
        """The text rewritten (block groups in it reordered), or None when it stays as it is."""

    def units(self, units: Sequence[bytes], kind: str) -> tuple[int, ...] | None:
        """An order for whole blocks (position ``j`` sends ``units[order[j]]``), or None to keep theirs."""


class AnswerStream(Protocol):
    """Rewrites a streamed answer event by event: ``feed`` returns the complete events so far, ``flush`` the rest."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class AnswerRewriter(Protocol):
    """Puts what the engine said about the blocks it was sent back in the client's terms (citation indices)."""

    def json(self, body: bytes) -> bytes: ...

    def stream(self) -> AnswerStream: ...


class ScopedWalker:
    """A ``Walker`` over the planner's steps: texts and runs whose kind is out of ``scope`` are fed as they are."""

    __slots__ = ("_scope", "_text", "_units", "feed")

    def __init__(
        self,
        feed: Callable[[bytes], None],
        text: Callable[[str], str | None],
        units: Callable[[Sequence[bytes]], tuple[int, ...] | None],
        scope: Container[str],
    ) -> None:
        self.feed, self._text, self._units, self._scope = feed, text, units, scope

    def text(self, text: str, kind: str) -> str | None:
        if kind in self._scope:
            return self._text(text)
        self.feed(text.encode("utf-8", "surrogatepass"))
        return None

    def units(self, units: Sequence[bytes], kind: str) -> tuple[int, ...] | None:
        if kind in self._scope:
            return self._units(units)
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


def with_fields(obj: dict[str, msgspec.Raw], fields: dict[str, Any]) -> msgspec.Raw:
    """The object with ``fields`` replaced; its other fields keep their exact bytes."""
    updated = dict(obj)
    for key, value in fields.items():
        updated[key] = msgspec.Raw(_encoder.encode(value))
    return msgspec.Raw(_encoder.encode(updated))
