"""Meaning kept: decide per block group, from the whole request, whether its blocks may move and be renumbered.

Reordering is only safe for labels that nothing can refer to. :func:`scan` reads one text for *cues*:

- ``num``: a reference to a block by its number, outside a line-start label: ``[3]``, ``[1, 4]``, ``[2-3]``,
  ``[Doc 2]``, ``source [3]``, ``Document 1``, ``Doc #2``;
- ``pos``: a reference by position: "the first result", "the last two documents", "the top source"; its value
  is the position (1-based; -1 the last) and "the first two" makes two cues, 0 when it cannot be told ("the
  first few");
- ``cite``: an instruction to cite by number: "cite them as [n]", "reference sources by their number";
- ``ranked`` / ``chronological``: the text says blocks come in a meaningful order ("ranked by relevance",
  "most relevant first", "in chronological order", "newest first");
- ``label``: a line-start label ``[3]`` / ``Document 3:`` (recorded only to detect ambiguous citation mapping).

:func:`decide` gives each group of one text a :class:`Decision` from the cues of that text that lie outside the
group and the cues of every other text of the request (the question, the system prompt, earlier answers):

1. ``leave_alone``: the request calls the blocks ranked or chronological, refers to a block by position, the
   group's own blocks are dated in order (emails Mon/Tue/Wed) or read as steps ("Step 1", "First ... Then"), a
   numeric reference or a cite-by-number instruction meets a group whose blocks carry no numbers (the number
   can only mean a position);
2. ``keep_labels``: a numeric reference falls in the group's numbers, or the prompt asks to cite by number:
   the blocks move *with* their own labels (``[3]`` stays on the same document);
3. ``map``: as 2 for a cite-by-number instruction when citation mapping is on and the answer's numbers can be
   mapped back unambiguously: renumbered for the cache, the answer rewritten (``gateway.planning.citemap``);
4. ``renumber``: nothing can refer to the labels; blocks move and numbers follow the position.

A decision made because the request refers to positions (``referenced``) carries them (``Decision.positions``):
an order that keeps each of them in place means the same (the planner then keeps the order a conversation's
earlier turn was sent in).

The cues of the *other* texts are summarised by :meth:`RequestCues.others` into a small, order-free
signature; the planner puts it in its memo key, as the decisions depend on it. Every pattern is linear
(bounded repetitions, no nested quantifiers).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gateway.planning.intercept.groups import BlockGroup
from gateway.planning.intercept.ordered import chronological, steps

__all__ = ["Cue", "Decision", "Others", "RequestCues", "TextCues", "decide", "decide_request", "scan"]

Action = Literal["renumber", "keep_labels", "map", "leave_alone"]
Cue = tuple[str, int]
_MAX_LABEL = 4096
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# Every cue pattern starts with one of its trigger words (_TRIGGERS) and is only tried, anchored, where one
# occurs at a word start: a long text costs a few substring searches, not an alternation tried at every character.
_WORD = (
    r"(?:doc(?:ument)?s?|sources?|passages?|chunks?|contexts?|results?|search[ \t]+results?|references?|excerpts?"
    r"|snippets?|articles?|evidence|refs?|citations?)"
)
_BRACKET = re.compile(
    rf"\[(?:{_WORD}[ \t]*#?[ \t]*)?(\d{{1,4}}(?:[ \t]*(?:,|;|-|\u2013|and)[ \t]*\d{{1,4}}){{0,20}})\]",
)
_WORD_REF = re.compile(rf"{_WORD}[ \t]*(?:#|no\.?[ \t]*|number[ \t]+)?\[?(\d{{1,4}})\b\]?")  # "doc2" too
_LINE_LEAD = re.compile(r"[ \t>*#-]*")
_LABEL_AFTER = re.compile(r"[ \t]*(?:\([^()\n]{0,200}\)[ \t]*)?(?::|\.(?:\s|$)|[ \t]+[-\u2013\u2014|][ \t]|\r?\n|$)")
_ORDINAL_WORDS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "last", "final",
    "top", "bottom", "topmost", "penultimate", "1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "10th",
)  # fmt: skip
_POSITION = re.compile(
    rf"(?:{'|'.join(_ORDINAL_WORDS)})[ \t]+(?:(?:two|three|four|five|few|couple|\d)[ \t]+)?"
    r"(?:(?:search|retrieved|returned|provided|given|listed|ranked|cited)[ \t]+)?"
    r"(?:results?|documents?|docs?|sources?|passages?|chunks?|snippets?|contexts?|articles?|excerpts?|hits?"
    r"|items?|entries|entry|emails?|records?|citations?|links?|references?|pages?|ones?)\b",
)
_ARTICLE_BEFORE = re.compile(r"\b(?:the|your|my)[ \t]+(?:very[ \t]+)?\Z")  # "the first result", not "first results"
_PLACEHOLDER = (
    r"\[(?:n|x|k|i|#|\d{1,3}|number|num|id|index|source[ _-]?(?:id|number|num|n)?|doc(?:ument)?[ _-]?"
    r"(?:id|number|num|n)?|citation(?:[ _-]?number)?|ref)\]"
)
_WORD_PLACEHOLDER = _PLACEHOLDER.replace(r"|\d{1,3}", "")  # "use [n] to cite"; "[2] ... cite" is a reference
_CITE = re.compile(
    rf"(?:cit(?:e|es|ed|ing|ations?)|referenc(?:e|es|ing)|refer[ \t]+to|attribut(?:e|ing)|footnotes?)\b"
    rf"[^.\n]{{0,100}}?(?:{_PLACEHOLDER}|\bby[ \t]+(?:their|its|the)?[ \t]*(?:numbers?|index|indices|ids?|labels?)\b"
    r"|\b(?:source|document|doc|passage|citation|reference)[ \t]+(?:numbers?|ids?|index|labels?)\b)"
    rf"|{_WORD_PLACEHOLDER}[^.\n]{{0,60}}?\b(?:cit|refer|source|attribut)"
    r"|(?:numbered|numeric|numerical|bracketed)[ \t]+(?:citations?|references?|sources?)\b",
)
_RANKED = re.compile(
    r"(?:ranked|sorted|ordered|listed|arranged)[ \t]+(?:by|in[ \t]+order[ \t]+of|according[ \t]+to"
    r"|from[ \t]+most)[ \t]+(?:(?:their|decreasing|descending|the)[ \t]+)?(?:relevan\w*|scores?|similarity"
    r"|importance|priority|rank|confidence|usefulness|quality)"
    r"|(?:most|highest|best)[ \t-]+(?:relevant|ranked|scoring|similar)[ \t]+(?:\w+[ \t]+)?(?:first|on[ \t]+top"
    r"|at[ \t]+the[ \t]+top)\b"
    r"|(?:descending|decreasing)[ \t]+order[ \t]+of[ \t]+(?:relevan|score|similar|importan)"
    r"|order[ \t]+of[ \t]+(?:relevan|importan|priorit|preferen)"
    r"|top[ \t-]+ranked\b|ranking[ \t]+order\b",
)
_CHRONO = re.compile(
    r"(?:reverse[ \t]+)?chronological(?:ly)?\b|(?:oldest|newest|earliest|latest|most[ \t]+recent)"
    r"[ \t]+(?:\w+[ \t]+)?first\b|(?:sorted|ordered|listed|arranged)[ \t]+by[ \t]+(?:date|time|timestamp|recency)"
    r"|order[ \t]+(?:they|it)[ \t]+(?:were|was)[ \t]+(?:sent|received|written|posted|published|created)"
    r"|timeline\b",
)
_TRIGGERS: dict[re.Pattern[str], tuple[str, ...]] = {
    _BRACKET: ("[",),
    _WORD_REF: ("doc", "source", "passage", "chunk", "context", "result", "search", "ref", "excerpt", "snippet",
                "article", "evidence", "citation"),
    _POSITION: _ORDINAL_WORDS,
    _CITE: ("cit", "referenc", "refer", "attribut", "footnote", "[", "numbered", "numeric", "bracketed"),
    _RANKED: ("ranked", "sorted", "ordered", "listed", "arranged", "most", "highest", "best", "descending",
              "decreasing", "order", "top", "ranking"),
    _CHRONO: ("reverse", "chronolog", "oldest", "newest", "earliest", "latest", "most", "sorted", "ordered",
              "listed", "arranged", "order", "timeline"),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Decision:
    """What may happen to one group: ``renumber``, ``keep_labels``, ``map`` or ``leave_alone``, and why."""

    action: Action
    reason: str = ""
    positions: frozenset[int] | None = field(default=None, compare=False)
    """For ``referenced``: the positions the request refers to (1-based, -1 the last), None when not known."""

    @property
    def moves(self) -> bool:
        return self.action != "leave_alone"

    @property
    def renumbers(self) -> bool:
        return self.action in ("renumber", "map")


@dataclass(frozen=True, slots=True)
class TextCues:
    """The cues of one text with where they are (``(kind, value, position)``), in text order."""

    found: tuple[tuple[str, int, int], ...]

    def kinds(self) -> Counter[Cue]:
        return Counter((kind, value) for kind, value, _ in self.found)

    def outside(self, start: int, end: int) -> set[Cue]:
        return {(kind, value) for kind, value, at in self.found if not start <= at < end}

    def with_labels(self, groups: Iterable[BlockGroup]) -> TextCues:
        """These cues plus the numbers the groups' blocks carry (``label``), for citation mapping's check that
        no other list of the request uses the same numbers."""
        labels = [("label", b.number.value, b.start) for g in groups for b in g.blocks if b.number is not None]
        return TextCues(tuple(sorted((*self.found, *labels), key=lambda cue: cue[2]))) if labels else self


@dataclass(frozen=True, slots=True)
class Others:
    """The cues of the other texts of a request: order-free, so its ``signature`` keys the planner's memo."""

    cues: frozenset[Cue] = frozenset()

    @property
    def signature(self) -> bytes:
        return ";".join(f"{kind}{value}" for kind, value in sorted(self.cues)).encode()


NO_OTHERS = Others()


class RequestCues:
    """The cues of every text of one request, keyed by the caller's text keys (message and part index)."""

    def __init__(self, texts: Iterable[tuple[Hashable, TextCues]]) -> None:
        self._own: dict[Hashable, Counter[Cue]] = {}
        self._total: Counter[Cue] = Counter()
        for key, cues in texts:
            counts = cues.kinds()
            self._own[key] = counts
            self._total.update(counts)

    def others(self, key: Hashable) -> Others:
        own = self._own.get(key, Counter())
        return Others(frozenset(cue for cue, count in self._total.items() if count > own.get(cue, 0)))


def _line_start_label(text: str, at: int, end: int) -> bool:
    """Whether the match at ``at`` is a block's own label: first on its line and followed by ``:``, a line end..."""
    line = text.rfind("\n", 0, at) + 1
    lead = _LINE_LEAD.match(text, line)
    if lead is None or lead.end() != at:
        return False
    if text[at] == "[":
        return end >= len(text) or text[end] in " \t\r\n:"
    return _LABEL_AFTER.match(text, end) is not None


_LIST_SPLIT = re.compile(r"[ \t]*(?:,|;|and)[ \t]*")
_RANGE = re.compile(r"(\d+)[ \t]*(?:-|\u2013)[ \t]*(\d+)")


def _numbers(spec: str) -> list[int]:
    """The numbers of a bracket: ``1, 3`` is two, ``2-4`` three (short ranges only)."""
    values: list[int] = []
    for part in _LIST_SPLIT.split(spec):
        span = _RANGE.fullmatch(part)
        if span is not None and 0 <= int(span.group(2)) - int(span.group(1)) <= 64:
            values.extend(range(int(span.group(1)), int(span.group(2)) + 1))
        elif part.isdigit():
            values.append(int(part))
    return [value for value in values if value <= _MAX_LABEL]


def _anchored(lower: str, segments: Sequence[tuple[int, int]], pattern: re.Pattern[str]) -> Iterator[re.Match[str]]:
    """Matches of ``pattern`` that start at one of its trigger words (at a word start) inside ``segments``."""
    for start, end in segments:
        hits: set[int] = set()
        for trigger in _TRIGGERS[pattern]:
            at = lower.find(trigger, start, end)
            while at >= 0:
                hits.add(at)
                at = lower.find(trigger, at + 1, end)
        reached = start
        for at in sorted(hits):
            if at < reached or (at > 0 and lower[at].isalnum() and lower[at - 1].isalnum()):
                continue
            match = pattern.match(lower, at, end)
            if match is not None:
                reached = match.end()
                yield match


_BY_ID = re.compile(r"\bids?\b|[ _-]id\]")
_BY_NUMBER = re.compile(r"\[(?:n|x|k|i|#|\d{1,3})\]|number|numer|index|indices")


def _cite_kind(instruction: str) -> str:
    """``cite_id`` for "cite document ids" / "[doc_id]" (an identifier travels with its block), else ``cite``."""
    return "cite_id" if _BY_ID.search(instruction) and not _BY_NUMBER.search(instruction) else "cite"


_SENTENCE_END = re.compile(r"(?<!\b[A-Za-z])\.(?:\s|\Z)|\n")  # "e.g." and "i.e." end no sentence


def _sentence_end(text: str, at: int) -> int:
    """Where the sentence holding ``at`` ends (the instruction's examples, ``[1], [2]``, lie before it)."""
    match = _SENTENCE_END.search(text, at, at + 200)
    return match.start() if match is not None else min(len(text), at + 200)


def scan(text: str, *, labels: bool = False, skip: Sequence[tuple[int, int]] = (), holds: bool = True) -> TextCues:
    """Return the cues of one text (see the module docstring); ``labels`` also records line-start labels.

    ``skip`` lists sorted, disjoint spans not to read (the text's own block groups: what a document says is not
    an instruction about the documents, and skipping them keeps the scan to the prompt's own words). ``holds``:
    whether the text may hold blocks of its own; when not (an assistant answer, a text out of scope), a line-start
    ``[2]`` or ``Document 2:`` labels nothing there, so it names a block of another text (``num``).
    """
    lower = text.translate(_ASCII_LOWER)  # the patterns are lowercase: a third of the cost of IGNORECASE

    segments: list[tuple[int, int]] = []
    position = 0
    for start, end in (*skip, (len(text), len(text))):
        if start > position:
            segments.append((position, start))
        position = end

    def finditer(pattern: re.Pattern[str]) -> Iterator[re.Match[str]]:
        return _anchored(lower, segments, pattern)

    found: list[tuple[str, int, int]] = []
    cites = list(finditer(_CITE))
    instructions = [(match.start(), _sentence_end(text, match.end())) for match in cites]
    for pattern in (_BRACKET, _WORD_REF):
        for match in finditer(pattern):
            if any(start <= match.start() < end for start, end in instructions):
                continue  # "cite them as [1], [2]": examples of the format, not references
            is_label = holds and _line_start_label(text, match.start(), match.end())
            if is_label and not labels:
                continue
            kind = "label" if is_label else "num"
            found.extend((kind, value, match.start()) for value in _numbers(match.group(1)))
    found.extend((_cite_kind(match.group()), 0, match.start()) for match in cites)
    found.extend(
        ("pos", position, match.start())
        for match in finditer(_POSITION)
        if _ARTICLE_BEFORE.search(lower, max(0, match.start() - 16), match.start())
        for position in _positions(match.group())
    )
    for kind, pattern in (("ranked", _RANKED), ("chronological", _CHRONO)):
        found.extend((kind, 0, match.start()) for match in finditer(pattern))
    found.sort(key=lambda cue: cue[2])
    return TextCues(tuple(found))


_ORDINAL_VALUES = {
    **{word: n for n, word in enumerate(_ORDINAL_WORDS[:10], 1)},
    **{f"{n}{suffix}": n for n, suffix in zip(range(1, 11), ("st", "nd", "rd", *("th",) * 7), strict=True)},
    "top": 1, "topmost": 1, "last": -1, "final": -1, "bottom": -1, "penultimate": -2,
}  # fmt: skip
_COUNTS = {"two": 2, "three": 3, "four": 4, "five": 5, **{str(n): n for n in range(10)}}


def _positions(reference: str) -> list[int]:
    """The positions a ``_POSITION`` match names: ``first`` 1, ``last`` -1, ``first two`` 1 and 2, ``last
    three`` -1 to -3; 0 when it cannot be told (``the first few``, ``the second two``)."""
    ordinal, *rest = reference.split()
    value = _ORDINAL_VALUES.get(ordinal, 0)
    head = rest[0] if len(rest) >= 2 else ""  # a count, or a word like "retrieved", before the noun
    if head in ("few", "couple"):
        return [0]
    count = _COUNTS.get(head)
    if count is None:
        return [value]
    return [value * n for n in range(1, count + 1)] if value in (1, -1) and count else [0]


def decide(
    text: str,
    groups: Sequence[BlockGroup],
    others: Others = NO_OTHERS,
    *,
    mapping: bool = False,
    own: TextCues | None = None,
) -> list[Decision]:
    """One :class:`Decision` per group of ``text`` (see the module docstring); ``own`` is the text's
    :func:`scan`, with the groups skipped or not (a cue inside a group never counts for that group)."""
    own = own if own is not None else scan(text, labels=mapping)
    decisions: list[Decision] = []
    previous_end = 0
    for group in groups:
        cues = others.cues | own.outside(group.start, group.end)
        kinds = {kind for kind, _ in cues}
        numbers = {value for kind, value in cues if kind == "num"}
        labels = {value for kind, value in cues if kind == "label"}
        base = group.number_base
        span = range(base, base + len(group)) if base is not None else range(1, len(group) + 1)
        decision = _decide(
            text, group, kinds, numbers=numbers, labels=labels, span=span, mapping=mapping, floor=previous_end
        )
        if decision.reason == "referenced" and decision.action == "leave_alone":
            named = {value for kind, value in cues if kind == "pos"} | {n for n in numbers if n in span}
            known = None if 0 in named or base is not None else frozenset(named)
            decision = Decision(decision.action, decision.reason, known)
        decisions.append(decision)
        previous_end = group.end
    return decisions


def _decide(
    text: str,
    group: BlockGroup,
    kinds: set[str],
    *,
    numbers: set[int],
    labels: set[int],
    span: range,
    mapping: bool,
    floor: int,
) -> Decision:
    if "ranked" in kinds:
        return Decision("leave_alone", "ranked")
    if "chronological" in kinds or chronological(text, group):
        return Decision("leave_alone", "chronological")
    if steps(text, group, floor):
        return Decision("leave_alone", "steps")
    if "pos" in kinds:
        return Decision("leave_alone", "referenced")
    referenced = any(value in span for value in numbers)
    numbered = group.number_base is not None
    if not numbered:
        if referenced:
            return Decision("leave_alone", "referenced")
        if "cite" in kinds or ("cite_id" in kinds and not _identified(text, group)):
            return Decision("leave_alone", "cite_by_position")
        return Decision("renumber")
    if referenced:
        return Decision("keep_labels", "referenced")
    if "cite" in kinds or "cite_id" in kinds:  # a block's number may be the only id it has
        if mapping and not any(value in span for value in labels):
            return Decision("map", "cite_by_number")
        return Decision("keep_labels", "cite_by_number")
    return Decision("renumber")


_IDENTIFIER = re.compile(r"""(?i)\b(?:id|doc_id|source|path|name|title|url|file)\s*[=:]|"id"\s*:""")


def _identified(text: str, group: BlockGroup) -> bool:
    """Whether every block names itself before its content (``id="..."``, ``"id":``, a markdown header), so
    "cite the document ids" means something that moves with the block."""
    if group.format == "markdown_header":
        return True
    return all(_IDENTIFIER.search(text, b.start, max(b.content_start, min(b.end, b.start + 200))) for b in group.blocks)


def decide_request(
    texts: Mapping[Hashable, str], groups: Mapping[Hashable, Sequence[BlockGroup]], *, mapping: bool = False
) -> dict[Hashable, list[Decision]]:
    """Every group's decision, from every text of one request (``groups``: the groups found per text key).

    The one-call form of :func:`scan`, :class:`RequestCues` and :func:`decide`; the planner makes the same
    calls itself, with each text's scan memoised.
    """
    cues = {key: scan(text, labels=mapping, skip=[(g.start, g.end) for g in groups.get(key, ())]) for key, text in
            texts.items()}  # fmt: skip
    if mapping:
        cues = {key: found.with_labels(groups.get(key, ())) for key, found in cues.items()}
    request = RequestCues(cues.items())
    return {
        key: decide(texts[key], found, request.others(key), mapping=mapping, own=cues[key])
        for key, found in groups.items()
        if found
    }
