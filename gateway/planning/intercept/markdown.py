"""Markdown sections that hold retrieved documents: ``## Document 1``, ``### Source: wiki/Paris``, ``## [2] Title``.

In ``auto`` mode a section counts only when its ATX header reads like a retrieved item (a document word or a
``[N]`` number right after the hashes), so ordinary markdown documents and prompt sections (``## Rules``,
``## Question``) are never reordered. A run is a sequence of such headers at one level, broken by any header at
that level or above that is not one of them; deeper headers belong to the section. When the caller asks for
``markdown_header`` explicitly, every header of the shallowest level used at least twice starts a section.

Numbers in the headers (``Document 3``) are rewritten by position when they count up by one across the run;
otherwise they are identifiers and stay. Years and other numbers from 1000 up (``## Document 2021 annual
report``) and article numbers (``## Article 12``) are identifiers even when they count up by one. The last
section ends by the rule in :mod:`gateway.planning.intercept.lines`.
"""

from __future__ import annotations

import re
from itertools import pairwise
from typing import NamedTuple

from gateway.planning.intercept.groups import Block, BlockGroup, NumberSpan
from gateway.planning.intercept.lines import LinePattern, last_end, rstrip_end, shape_of
from gateway.planning.intercept.numbered import FIRST_IDENTIFIER
from gateway.planning.intercept.regions import Spans

__all__ = ["find_markdown_groups"]

_HEADER = LinePattern(r"(#{1,6})[ \t]+(?=\S)")
_NUM = r"0|[1-9]\d{0,5}"
_WORDS = r"(?i:document|doc|source|passage|result|search result|chunk|snippet|excerpt|article|file|memory)"
_DOC_HEADER = re.compile(
    rf"\[(?P<b>{_NUM})\]"
    rf"|{_WORDS}[ \t]*(?:(?:#|no\.?)[ \t]*)?(?:\[(?P<wb>{_NUM})\]|(?P<wn>{_NUM})\b)"
    rf"|{_WORDS}[ \t]*(?::|[ \t\r]*(?=\n|\Z))",
)


_AFTER_NUMBER = re.compile(r"\]?[ \t]*[:.\-\u2013\u2014]?\s*")


class _Header(NamedTuple):
    start: int
    level: int
    number: NumberSpan | None
    doc_like: bool


def _headers(text: str, fences: Spans, claims: Spans) -> list[_Header]:
    found = []
    for line_start, match in _HEADER.finditer(text):
        if fences.contains(line_start) or claims.contains(line_start):
            continue
        doc = _DOC_HEADER.match(text, match.end())
        number = None
        if doc is not None and doc.lastgroup is not None:
            digits = doc.span(doc.lastgroup)
            number = NumberSpan(digits[0], digits[1], int(doc.group(doc.lastgroup)))
        found.append(_Header(line_start, len(match.group(1)), number, doc is not None))
    return found


def _runs(headers: list[_Header], level: int, strict: bool) -> list[tuple[list[_Header], int]]:
    """Return runs of section headers at ``level``, each with the start of the header that ends it (or -1)."""
    runs: list[tuple[list[_Header], int]] = []
    current: list[_Header] = []
    for header in headers:
        if header.level > level:
            continue
        if header.level == level and (header.doc_like or not strict):
            current.append(header)
            continue
        if len(current) >= 2:
            runs.append((current, header.start))
        current = []
    if len(current) >= 2:
        runs.append((current, -1))
    return runs


def _numbers(text: str, run: list[_Header]) -> bool:
    first = run[0].number
    if first is None or first.value >= FIRST_IDENTIFIER or "article" in text[run[0].start : first.start].lower():
        return False
    return all(h.number is not None and h.number.value == first.value + i for i, h in enumerate(run))


def _block(text: str, header: _Header, end: int, numbered: bool) -> Block:
    """A section; when its header is a position number (``## Document 3``) the content starts after it."""
    if not numbered or header.number is None:
        return Block(header.start, end, header.start, end)
    lead = _AFTER_NUMBER.match(text, header.number.end, end)
    return Block(header.start, end, lead.end() if lead is not None else header.number.end, end, header.number)


def _group(text: str, run: list[_Header], limit: int, fences: Spans, strict: bool) -> BlockGroup | None:
    numbered = _numbers(text, run)
    blocks = [_block(text, h, rstrip_end(text, h.start, following.start), numbered) for h, following in pairwise(run)]
    last = run[-1]
    spans = [(b.start, b.end) for b in blocks]
    last_stop = last_end(text, last.start, limit, shape_of(text, spans, fences), fences, heading_level=last.level)
    if last_stop is None and not strict:
        last_stop = rstrip_end(text, last.start, limit)
    if last_stop is not None:
        blocks.append(_block(text, last, last_stop, numbered))
    if len(blocks) < 2:
        return None
    base = run[0].number.value if numbered and run[0].number is not None else None
    return BlockGroup("markdown_header", "#" * last.level, tuple(blocks), base, blocks[-1].end)


def _explicit_level(headers: list[_Header]) -> int:
    counts = [0] * 7
    for header in headers:
        counts[header.level] += 1
    return next((level for level in range(1, 7) if counts[level] >= 2), 0)


def find_markdown_groups(text: str, fences: Spans, claims: Spans, strict: bool = True) -> list[BlockGroup]:
    """Return candidate markdown-section groups (they may overlap each other, never ``claims``)."""
    if "#" not in text:
        return []
    headers = _headers(text, fences, claims)
    levels = sorted({h.level for h in headers if h.doc_like}) if strict else [_explicit_level(headers)]
    groups = []
    for level in levels:
        if level == 0:
            continue
        for run, ended_by in _runs(headers, level, strict):
            limit = claims.next_start(run[-1].start, len(text) if ended_by < 0 else ended_by)
            group = _group(text, run, limit if ended_by < 0 else min(limit, ended_by), fences, strict)
            if group is not None:
                groups.append(group)
    return groups
