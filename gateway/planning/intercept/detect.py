"""``find_groups``: run the format detectors over one text and return disjoint block groups.

In ``auto`` mode the detectors run from the most to the least explicit format, and a later detector never
takes text that an earlier one claimed:

1. JSON results (the whole text is a JSON object; nothing else is tried when it yields groups);
2. XML-like tags (their items may contain anything, including unbalanced code fences);
3. numbered items, then markdown sections (where candidates of one detector overlap, the longer wins, so an
   outer ``Document N:`` list beats a ``1.`` list inside one of its documents);
4. LangChain / LlamaIndex templates (a template whose context already holds a group is left to that group);
5. separator lines;
6. with ``learn``, when nothing else was found and no known template either: the text's paragraphs after its
   first, a candidate whose boundaries only traffic confirms (an application's own template, learned by the
   planner: :mod:`gateway.planning.intercept.boundaries`).

Fenced code and YAML front matter are protected: no marker inside them counts, and a group whose blocks
would cut a fence in two is dropped. Texts longer than :data:`MAX_TEXT_CHARS` are not inspected. Every
detector is a handful of linear scans with compiled patterns that cannot backtrack catastrophically; what a
detector reads per candidate group is bounded by the size of that group (see :func:`~gateway.planning.intercept.lines.
scan_window`), never by the rest of the text. A ``deadline`` (see :mod:`gateway.planning.intercept.budget`) is checked
between detectors and between the candidates of one detector.
"""

from __future__ import annotations

from bisect import bisect_right

from gateway.planning.intercept.budget import check
from gateway.planning.intercept.groups import MODES, BlockGroup
from gateway.planning.intercept.jsonresults import find_json_groups
from gateway.planning.intercept.markdown import find_markdown_groups
from gateway.planning.intercept.numbered import find_numbered_groups
from gateway.planning.intercept.regions import Spans, fenced_spans, front_matter_end
from gateway.planning.intercept.separators import find_separator_groups
from gateway.planning.intercept.templates import find_learned_candidate, find_template_groups
from gateway.planning.intercept.xmltags import find_xml_groups

__all__ = ["MAX_TEXT_CHARS", "find_groups"]

MAX_TEXT_CHARS = 4_000_000
"""Texts longer than this (in characters) are left alone."""


def _fits(group: BlockGroup, protected: Spans) -> bool:
    """Whether every protected span that touches the group lies inside a single block."""
    blocks = group.blocks
    starts = [block.start for block in blocks]
    for start, end in protected.within(group.start, group.end):
        index = bisect_right(starts, start) - 1
        if index < 0 or end > blocks[index].end:
            return False
    return True


def _longest_first(cluster: list[BlockGroup]) -> list[BlockGroup]:
    chosen: list[BlockGroup] = []
    for group in sorted(cluster, key=lambda g: (g.start - g.end, g.start)):
        if all(group.end <= other.start or other.end <= group.start for other in chosen):
            chosen.append(group)
    return chosen


def _select(candidates: list[BlockGroup], claims: Spans, protected: Spans) -> list[BlockGroup]:
    """Keep candidates clear of ``claims`` and ``protected``; among overlapping ones, the longest."""
    usable = sorted(
        (g for g in candidates if not claims.overlaps(g.start, g.end) and _fits(g, protected)),
        key=lambda g: g.start,
    )
    chosen: list[BlockGroup] = []
    cluster: list[BlockGroup] = []
    cluster_end = -1
    for group in usable:
        if cluster and group.start < cluster_end:
            cluster.append(group)
            cluster_end = max(cluster_end, group.end)
            continue
        chosen.extend(cluster if len(cluster) == 1 else _longest_first(cluster))
        cluster = [group]
        cluster_end = group.end
    chosen.extend(cluster if len(cluster) == 1 else _longest_first(cluster))
    return chosen


def _spans(groups: list[BlockGroup]) -> list[tuple[int, int]]:
    return [(group.start, group.end) for group in groups]


def find_groups(
    text: str,
    mode: str = "auto",
    *,
    tag: str | None = None,
    separator: str | None = None,
    deadline: float | None = None,
    learn: bool = False,
) -> list[BlockGroup]:
    """Return the block groups of ``text`` in text order; they never overlap.

    ``mode`` is ``auto`` or one format (see :data:`~gateway.planning.intercept.groups.MODES`); an explicit format
    relaxes the heuristics that guard ``auto`` against prose and instructions. ``tag`` names the only item tag
    for ``xml_tag``, ``separator`` the only separator line for ``separator`` (both also apply in ``auto``).
    ``learn``: also the candidate of a learned template (step 6 above; format ``learned``), not a group until
    traffic confirms its boundaries. Raises ``ValueError`` for an unknown mode or an invalid tag name, and
    :class:`~gateway.planning.intercept.budget.BudgetExceeded` once ``deadline`` has passed; never for the text itself.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
    if not text or len(text) > MAX_TEXT_CHARS:
        return []
    strict = mode == "auto"
    if mode in ("auto", "json_results"):
        found = find_json_groups(text, strict)
        if found or mode == "json_results":
            return found
    groups: list[BlockGroup] = []
    if mode in ("auto", "xml_tag"):
        groups = find_xml_groups(text, tag)
    skip_before = front_matter_end(text)
    claims = Spans(_spans(groups))
    protected = fenced_spans(text, claims.union([(0, skip_before)])).union([(0, skip_before)])
    groups = [group for group in groups if not protected.contains(group.start)]
    claims = Spans(_spans(groups))
    check(deadline)
    if mode in ("auto", "numbered"):
        found = find_numbered_groups(text, protected, claims, strict, deadline=deadline)
        groups += _select(found, claims, protected)
        claims = Spans(_spans(groups))
    check(deadline)
    if mode in ("auto", "markdown_header"):
        groups += _select(find_markdown_groups(text, protected, claims, strict), claims, protected)
        claims = Spans(_spans(groups))
    reserved = claims
    regions: list[tuple[int, int]] = []
    check(deadline)
    if mode in ("auto", "template"):
        found, regions = find_template_groups(text, protected)
        groups += _select(found, claims, protected)
        claims = Spans(_spans(groups))
        reserved = claims.union(regions)
    check(deadline)
    if mode in ("auto", "separator"):
        found = find_separator_groups(
            text, protected, reserved, strict=strict, separator=separator, skip_before=skip_before, deadline=deadline
        )
        groups += _select(found, reserved, protected)
    if learn and mode in ("auto", "template") and not groups and not regions and not skip_before:
        check(deadline)
        candidate = find_learned_candidate(text, protected)
        if candidate is not None and _fits(candidate, protected):
            groups.append(candidate)
    groups.sort(key=lambda group: group.start)
    return groups
