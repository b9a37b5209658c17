"""XML-like document tags: ``<documents><document id="a">...</document>...</documents>``, ``<doc>``, ``<file path=..>``.

Elements are paired by name with a stack per name and arranged into a containment tree, so every group in the
text is found (not only the first wrapper), at any depth: a ``<context>`` that wraps ``<document>`` items is
descended into. A group is a run of at least two sibling elements with the same item name whose gaps are
whitespace only; text between items ends the run. Items are opaque: nothing inside an item that joined a group
is examined again, so ``<source>`` children of ``<document>`` items never form groups of their own.

Attributes are kept byte for byte. The one exception is Anthropic's long-context layout
``<document index="1">``: when every item of a run carries ``index="N"`` and the values count up by one, they are
position numbers and are rewritten by position like ``[N]``. ``id`` and every other attribute identify the
document, not its position, and are never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from gateway.intercept.groups import Block, BlockGroup, NumberSpan

__all__ = ["ITEM_TAGS", "WRAPPER_TAGS", "find_xml_groups"]

ITEM_TAGS = (
    "document",
    "doc",
    "context",
    "passage",
    "source",
    "file",
    "search_result",
    "search-result",
    "result",
    "chunk",
    "snippet",
    "excerpt",
    "reference",
    "article",
    "memory",
)
WRAPPER_TAGS = (
    "documents",
    "docs",
    "contexts",
    "passages",
    "sources",
    "files",
    "search_results",
    "search-results",
    "results",
    "chunks",
    "snippets",
    "excerpts",
    "references",
    "articles",
    "memories",
)
_DEFAULT_ITEMS = frozenset(ITEM_TAGS)
_DEFAULT_NAMES = tuple(sorted({*ITEM_TAGS, *WRAPPER_TAGS}))
_TAG_NAME = re.compile(r"[A-Za-z_][\w.:-]*")
_INDEX_ATTR = re.compile(r"""\sindex\s*=\s*(["'])(0|[1-9]\d{0,5})\1""")


@dataclass(slots=True, eq=False)
class _Element:
    name: str
    open_start: int
    open_end: int
    close_start: int
    close_end: int
    children: list[_Element] = field(default_factory=list)
    tainted: bool = False


@lru_cache(maxsize=64)
def _tag_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"<(/?)({alternatives})(?=[\s/>])([^<>]*)>")


def _elements(text: str, names: tuple[str, ...]) -> list[_Element]:
    """Pair opening and closing tags by name; unmatched and self-closing tags are ignored."""
    stacks: dict[str, list[re.Match[str]]] = {}
    found: list[_Element] = []
    for match in _tag_pattern(names).finditer(text):
        name = match.group(2)
        if not match.group(1):
            if not match.group(3).endswith("/"):
                stacks.setdefault(name, []).append(match)
            continue
        opened = stacks.get(name)
        if opened:
            opening = opened.pop()
            found.append(_Element(name, opening.start(), opening.end(), match.start(), match.end()))
    found.sort(key=lambda element: element.open_start)
    return found


def _tree(elements: list[_Element], length: int) -> _Element:
    """Arrange elements by containment under a synthetic root; an element crossing its parent taints the parent."""
    root = _Element("", 0, 0, length, length)
    stack = [root]
    for element in elements:
        while element.open_start >= stack[-1].close_end:
            stack.pop()
        parent = stack[-1]
        if element.close_end > parent.close_end:
            parent.tainted = True
            continue
        parent.children.append(element)
        stack.append(element)
    return root


def _blank(text: str, start: int, end: int) -> bool:
    return start == end or text[start:end].isspace()


def _runs(text: str, children: list[_Element], items: frozenset[str]) -> list[list[_Element]]:
    runs: list[list[_Element]] = []
    current: list[_Element] = []
    for child in children:
        usable = child.name in items and not child.tainted
        if (
            usable
            and current
            and child.name == current[-1].name
            and _blank(text, current[-1].close_end, child.open_start)
        ):
            current.append(child)
            continue
        if len(current) >= 2:
            runs.append(current)
        current = [child] if usable else []
    if len(current) >= 2:
        runs.append(current)
    return runs


def _numbers(text: str, run: list[_Element]) -> list[NumberSpan] | None:
    numbers = []
    for element in run:
        match = _INDEX_ATTR.search(text, element.open_start, element.open_end)
        if match is None:
            return None
        numbers.append(NumberSpan(match.start(2), match.end(2), int(match.group(2))))
    first = numbers[0].value
    if any(number.value != first + offset for offset, number in enumerate(numbers)):
        return None
    return numbers


def _group(text: str, parent: _Element, run: list[_Element]) -> BlockGroup:
    numbers = _numbers(text, run)
    blocks = tuple(
        Block(e.open_start, e.close_end, e.open_end, e.close_start, numbers[i] if numbers else None)
        for i, e in enumerate(run)
    )
    after = run[-1].close_end
    if (
        parent.name
        and run[0] is parent.children[0]
        and run[-1] is parent.children[-1]
        and not text[parent.open_end : run[0].open_start].strip()
        and not text[run[-1].close_end : parent.close_start].strip()
    ):
        after = parent.close_end
    return BlockGroup("xml_tag", run[0].name, blocks, numbers[0].value if numbers else None, after)


def find_xml_groups(text: str, tag: str | None = None) -> list[BlockGroup]:
    """Return every group of XML-like document elements in ``text``, in text order.

    ``tag`` restricts the item elements to that one name (its plural and the usual wrappers still count as
    wrappers); without it the names in :data:`ITEM_TAGS` are items.
    """
    if tag is not None and _TAG_NAME.fullmatch(tag) is None:
        raise ValueError(f"invalid tag name: {tag!r}")
    if "<" not in text:
        return []
    if tag is None:
        items, names = _DEFAULT_ITEMS, _DEFAULT_NAMES
    else:
        items = frozenset((tag,))
        names = tuple(sorted({tag, f"{tag}s", *WRAPPER_TAGS}))
    root = _tree(_elements(text, names), len(text))
    groups: list[BlockGroup] = []
    pending = [root]
    while pending:
        node = pending.pop()
        grouped: set[int] = set()
        for run in _runs(text, node.children, items):
            groups.append(_group(text, node, run))
            grouped.update(id(element) for element in run)
        pending.extend(child for child in node.children if id(child) not in grouped)
    groups.sort(key=lambda group: group.start)
    return groups
