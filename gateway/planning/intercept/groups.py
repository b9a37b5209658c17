"""The data types of prompt interception: a block, its position-dependent number, and a group of blocks.

Every type is a frozen ``msgspec.Struct`` (a tenth of the cost of a frozen dataclass to build, which matters on
the request path) holding *spans*, ``[start, end)`` offsets into the text it was found in, never copies of the
text; the methods that read text take that text as their first argument.

Span semantics, for a group ``g`` found in ``text``::

    text = preamble + r0 + gap0 + r1 + gap1 + ... + r(n-1) + tail
    preamble = text[:g.start]          r_i = text[b_i.start:b_i.end]
    gap_i = text[b_i.end:b_(i+1).start]     tail = text[g.end:]

A block's rendering ``r_i`` never starts or ends with whitespace that belongs to the layout; that whitespace and
any separator text (``---``, ``,`` between JSON elements) are in the gaps, which stay where they are when blocks
move: the gap after position ``i`` is still after position ``i``.
"""

from __future__ import annotations

import msgspec

__all__ = ["FORMATS", "MODES", "Block", "BlockGroup", "NumberSpan"]

FORMATS = frozenset(
    {
        "xml_tag",
        "numbered",
        "json_results",
        "separator",
        "markdown_header",
        "langchain",
        "llamaindex",
        "haystack",
        "learned",
    },
)
"""Values of :attr:`BlockGroup.format`."""

MODES = frozenset({"auto", "xml_tag", "numbered", "json_results", "separator", "markdown_header", "template"})
"""Values accepted by ``find_groups(mode=...)`` (ContextPilot's ``X-ContextPilot-Mode`` names plus ``template``)."""


class NumberSpan(msgspec.Struct, frozen=True, gc=False):
    """The digits of a position-dependent number inside a block (``3`` in ``[3]``, ``Document 3:``, ``index="3"``)."""

    start: int
    end: int
    value: int


class Block(msgspec.Struct, frozen=True, gc=False):
    """One retrieved unit: its full rendering, its content and, if any, its position-dependent number."""

    start: int
    end: int
    content_start: int
    content_end: int
    number: NumberSpan | None = None

    def render(self, text: str, number: int | None = None) -> str:
        """Return the block's bytes, with its number replaced by ``number`` when both exist."""
        num = self.number
        if num is None or number is None:
            return text[self.start : self.end]
        return f"{text[self.start : num.start]}{number}{text[num.end : self.end]}"

    def content(self, text: str) -> str:
        """Return the document text: the rendering without its numbered marker or enclosing tags."""
        return text[self.content_start : self.content_end]

    def key(self, text: str) -> str:
        """Return the block's identity string: the rendering with its number's digits cut out, stripped.

        Two blocks with the same key render byte-identically at the same position after a splice, which is
        what a prefix cache needs; the scheduler hashes this string.
        """
        num = self.number
        if num is None:
            return text[self.start : self.end].strip()
        return f"{text[self.start : num.start]}{text[num.end : self.end]}".strip()


class BlockGroup(msgspec.Struct, frozen=True, gc=False):
    """A run of at least two blocks in one text, in their original (retriever's) order.

    ``label`` names the variant: the item tag (``document``), the marker shape with ``#`` for the number
    (``[#]``, ``Document #``, ``#.``), the JSON key (``results``), the separator line (``---``), or the template
    (``retrieval_qa``). ``number_base`` is the original number of the first block when the blocks carry
    position-dependent numbers that a splice rewrites (block at new position ``p`` gets ``number_base + p``),
    else ``None``. ``after`` is where a relevance annotation may be inserted (after a wrapper's closing tag
    when the group fills a wrapper), or ``None`` where no text may be added (JSON). ``joined`` lists the blocks
    that continue the block before them (an indented code block, a table, the paragraph after a lone heading):
    set only on the paragraph candidates of a template context, whose learned grouping never cuts in front of
    them (:mod:`gateway.planning.intercept.boundaries`); a splice ignores it.
    """

    format: str
    label: str
    blocks: tuple[Block, ...]
    number_base: int | None = None
    after: int | None = None
    joined: tuple[int, ...] = ()

    @property
    def start(self) -> int:
        """Start of the first block's rendering."""
        return self.blocks[0].start

    @property
    def end(self) -> int:
        """End of the last block's rendering."""
        return self.blocks[-1].end

    def __len__(self) -> int:
        return len(self.blocks)

    def preamble(self, text: str) -> str:
        """Return the text before the first block, from the start of the text."""
        return text[: self.start]

    def tail(self, text: str) -> str:
        """Return the text after the last block, to the end of the text."""
        return text[self.end :]

    def gaps(self, text: str) -> list[str]:
        """Return the ``len(self) - 1`` texts between consecutive blocks."""
        blocks = self.blocks
        return [text[blocks[i].end : blocks[i + 1].start] for i in range(len(blocks) - 1)]

    def keys(self, text: str) -> list[str]:
        """Return :meth:`Block.key` of every block, in the original order."""
        return [block.key(text) for block in self.blocks]
