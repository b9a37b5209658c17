"""Auditing a rewrite: is the forwarded text the sent text with whole documents permuted, and nothing else?

The audit knows the documents (what a retriever returned, as the application rendered them), not the blocks a
detector found, so a detector that cut a document in the wrong place is caught, not repeated. The sent text is
read as template segments around the documents, ``t0 d0 t1 d1 ... d(n-1) tn`` (each document located after
the previous one); the forwarded text must then read ``t0' e0 t1' e1 ... tn'`` where the ``e`` are the same
documents in some order, each byte-identical, and every ``ti'`` is ``ti`` (the template's bytes in place: an
indent, a bullet, a separator, a closing tag) except for the digits of a label.

A label is the digits in the *label zone* of a segment: what precedes the document on its own lines (the text
after the segment's last blank line, or after its first line break): ``[3] `` in ``\\n[3] ``, ``Document 3:\\n``
in ``\\n\\nDocument 3:\\n``. A zone's digits either stay in place (a label renumbered by position, or no label)
or travel with the document that now follows (a label kept with its block, as the meaning rules require when
something refers to it). Digits anywhere else never change.

Used by the metamorphic tests (``tests/unit/test_rewrite_harness.py``) and usable by a benchmark that compares
the texts an application sent with those the engine received: ``audit_rewrite(sent, forwarded, documents)``
returns the permutation and how each label behaved, or raises :class:`Mangled` saying what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, NamedTuple

__all__ = ["Audit", "Mangled", "audit_rewrite"]

LabelRule = Literal["any", "positional", "attached"]
_DIGITS = re.compile(r"\d+")
_MAX_BRANCHES = 10_000


class Mangled(ValueError):
    """The forwarded text is not the sent text with whole documents permuted (or a label broke its rule)."""


class Audit(NamedTuple):
    """``order[p]``: the index (in sent order) of the document at position ``p`` of the forwarded text.
    ``labels[p]``: ``"in place"`` (the zone's digits did not change: renumbered by position, or no label, or the
    document did not move), ``"attached"`` (the digits came with the document)."""

    order: tuple[int, ...]
    labels: tuple[str, ...]

    @property
    def moved(self) -> bool:
        return self.order != tuple(range(len(self.order)))


def _zone_start(segment: str) -> int:
    blank = segment.rfind("\n\n")
    if blank >= 0:
        return blank + 2
    return segment.find("\n") + 1


def _segments(sent: str, documents: Sequence[str]) -> list[str]:
    segments = []
    pos = 0
    for index, document in enumerate(documents):
        found = sent.find(document, pos)
        if not document or found < 0:
            raise Mangled(f"document {index} is not in the sent text (after the previous one)")
        segments.append(sent[pos:found])
        pos = found + len(document)
    segments.append(sent[pos:])
    return segments


def _pattern(segment: str) -> re.Pattern[str]:
    pieces = []
    pos = 0
    for match in _DIGITS.finditer(segment):
        pieces.append(re.escape(segment[pos : match.start()]))
        pieces.append(r"(\d+)")
        pos = match.end()
    pieces.append(re.escape(segment[pos:]))
    return re.compile("".join(pieces))


def _digits(segment: str, start: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The segment's digit runs before and inside its label zone."""
    outside: list[str] = []
    inside: list[str] = []
    for match in _DIGITS.finditer(segment):
        (inside if match.start() >= start else outside).append(match.group())
    return tuple(outside), tuple(inside)


def _walk(forwarded: str, segments: list[str], documents: Sequence[str]) -> tuple[list[int], list[str]]:
    """Find the documents' order and the forwarded segments (depth first; identical documents are one choice)."""
    patterns = [_pattern(segment) for segment in segments]
    budget = [_MAX_BRANCHES]
    n = len(documents)

    def step(pos: int, i: int, used: list[bool], order: list[int], found: list[str]) -> bool:
        budget[0] -= 1
        if budget[0] < 0:
            raise Mangled("too ambiguous to audit")
        match = patterns[i].match(forwarded, pos)
        if match is None:
            return False
        if i == n:
            if match.end() != len(forwarded):
                return False
            found.append(match.group())
            return True
        found.append(match.group())
        tried: set[str] = set()
        for j in sorted(range(n), key=lambda k: -len(documents[k])):
            if used[j] or documents[j] in tried or not forwarded.startswith(documents[j], match.end()):
                continue
            tried.add(documents[j])
            used[j] = True
            order.append(j)
            if step(match.end() + len(documents[j]), i + 1, used, order, found):
                return True
            order.pop()
            used[j] = False
        found.pop()
        return False

    order: list[int] = []
    found: list[str] = []
    if not step(0, 0, [False] * n, order, found):
        raise Mangled(_first_difference(forwarded, segments, documents))
    return order, found


def _first_difference(forwarded: str, segments: list[str], documents: Sequence[str]) -> str:
    sent = "".join(s + d for s, d in zip(segments, [*documents, ""], strict=True))
    at = next(
        (i for i, (a, b) in enumerate(zip(sent, forwarded, strict=False)) if a != b), min(len(sent), len(forwarded))
    )
    return (
        f"not a permutation of whole documents in the sent template (texts differ from offset {at}: "
        f"sent {sent[at : at + 40]!r}, forwarded {forwarded[at : at + 40]!r})"
    )


def audit_rewrite(sent: str, forwarded: str, documents: Sequence[str], *, labels: LabelRule = "any") -> Audit:
    """Check that ``forwarded`` is ``sent`` with the ``documents`` (in sent order) permuted, each whole.

    ``labels``: ``"positional"`` requires every label zone's digits to stay in place (renumbered by position),
    ``"attached"`` requires them to travel with their documents, ``"any"`` accepts either per position. Raises
    :class:`Mangled` when the texts differ otherwise: a document cut, lost, duplicated or changed, a template
    byte moved (an indent, a separator), a number outside a label changed.
    """
    segments = _segments(sent, documents)
    order, found = _walk(forwarded, segments, documents)
    modes = []
    for position, segment in enumerate(segments):
        zone = _zone_start(segment)
        outside, inside = _digits(segment, zone)
        new_outside, new_inside = _digits(found[position], _zone_start(found[position]))
        if new_outside != outside:
            raise Mangled(f"a number outside a label changed before position {position}: {outside} -> {new_outside}")
        if position == len(documents):
            if new_inside != inside:
                raise Mangled(f"a number after the last document changed: {inside} -> {new_inside}")
            break
        source = order[position]
        in_place = new_inside == inside
        attached = new_inside == _digits(segments[source], _zone_start(segments[source]))[1]
        if not (in_place if labels == "positional" else attached if labels == "attached" else in_place or attached):
            raise Mangled(f"the label before position {position} broke the {labels!r} rule: {inside} -> {new_inside}")
        modes.append("in place" if in_place else "attached")
    return Audit(tuple(order), tuple(modes))
