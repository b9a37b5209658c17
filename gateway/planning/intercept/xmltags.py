"""XML-like document tags: ``<documents><document id="a">...</document>...</documents>``, ``<doc>``, ``<file path=..>``.

Elements are paired by name with a stack per name and arranged into a containment tree, so every group in the
text is found (not only the first wrapper), at any depth: a ``<context>`` that wraps ``<document>`` items is
descended into. A group is a run of at least two sibling elements with the same item name whose gaps are
whitespace only; text between items ends the run. Items are opaque: nothing inside an item that joined a group
is examined again, so ``<source>`` children of ``<document>`` items never form groups of their own.

Attributes are kept byte for byte. The one exception is Anthropic's long-context layout
``<document index="1">``: when every item of a run carries ``index="N"`` and the values count up by one, they are
position numbers and are rewritten by position like ``[N]`` (unless they start at 1000 or above, like years).
``id`` and every other attribute identify the document, not its position, and are never touched; the opening tag
is read attribute by attribute, so ``index='1'`` quoted inside another attribute's value is not the index.

Tags must pair cleanly: an opening tag left without its closing tag, or a closing tag without an opening one (a
document that mentions ``<document>`` in its text), makes the element that contains it (or the whole text) hold
no groups, since its items' boundaries are then in doubt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from gateway.planning.intercept.groups import Block, BlockGroup, NumberSpan
from gateway.planning.intercept.numbered import FIRST_IDENTIFIER

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
_ATTRIBUTE = re.compile(r"""\s+([^\s=/>"']+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")
_INDEX_VALUE = re.compile(r"0|[1-9]\d{0,5}")


@dataclass(slots=True, eq=False)
class _Element:
    name: str
    open_start: int
    open_end: int
    close_start: int
    close_end: int
    children: list[_Element] = field(default_factory=list)
    tainted: bool = False  # cannot be an item: it crosses another element or holds an unpaired tag
    unclean: bool = False  # holds an unpaired tag directly: its children form no groups


@lru_cache(maxsize=64)
def _tag_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"<(/?)({alternatives})(?=[\s/>])([^<>]*)>")


def _elements(text: str, names: tuple[str, ...]) -> tuple[list[_Element], list[int]]:
    """Pair opening and closing tags by name (self-closing tags are ignored); also return where unpaired tags are."""
    stacks: dict[str, list[re.Match[str]]] = {}
    found: list[_Element] = []
    unpaired: list[int] = []
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
        else:
            unpaired.append(match.start())
    unpaired.extend(opening.start() for opened in stacks.values() for opening in opened)
    found.sort(key=lambda element: element.open_start)
    return found, unpaired


def _mark_unpaired(root: _Element, positions: list[int]) -> None:
    """The innermost element holding each unpaired tag holds no groups, and no element around it is an item."""
    for pos in positions:
        node = root
        while True:
            node.tainted = True
            inner = next((c for c in node.children if c.open_start <= pos < c.close_end), None)
            if inner is None:
                node.unclean = True
                break
            node = inner


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


def _runs(text: str, node: _Element, items: frozenset[str]) -> list[list[_Element]]:
    if node.unclean:
        return []
    children = node.children
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


def _index_attribute(text: str, element: _Element) -> NumberSpan | None:
    """The ``index`` attribute of the element's opening tag when its value is a plain number, read attribute by
    attribute (so text quoted inside another attribute's value never counts)."""
    start = element.open_start + 1 + len(element.name)
    end = element.open_end - 1
    for match in _ATTRIBUTE.finditer(text, start, end):
        if match.group(1).lower() != "index":
            continue
        group = next((g for g in (2, 3, 4) if match.group(g) is not None), None)
        if group is None or _INDEX_VALUE.fullmatch(match.group(group)) is None:
            return None
        return NumberSpan(match.start(group), match.end(group), int(match.group(group)))
    return None


def _numbers(text: str, run: list[_Element]) -> list[NumberSpan] | None:
    numbers = []
    for element in run:
        number = _index_attribute(text, element)
        if number is None:
            return None
        numbers.append(number)
    first = numbers[0].value
    if first >= FIRST_IDENTIFIER or any(number.value != first + offset for offset, number in enumerate(numbers)):
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
    elements, unpaired = _elements(text, names)
    root = _tree(elements, len(text))
    _mark_unpaired(root, unpaired)
    groups: list[BlockGroup] = []
    pending = [root]
    while pending:
        node = pending.pop()
        grouped: set[int] = set()
        for run in _runs(text, node, items):
            groups.append(_group(text, node, run))
            grouped.update(id(element) for element in run)
        pending.extend(child for child in node.children if id(child) not in grouped)
    groups.sort(key=lambda group: group.start)
    return groups
