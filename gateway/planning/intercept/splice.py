"""Splicing: rewrite a text with the blocks of its groups in a new order, every other byte kept.

``order[p]`` is the index (in the group's original order) of the block that goes to position ``p``. Only the
blocks move: the preamble, the tail, the gaps between blocks (the gap after position ``p`` stays after
position ``p``) and everything outside the groups are copied unchanged. A block's position-dependent number is
rewritten to ``number_base + p``, so the same block renders identically wherever it lands; with the identity
order the text comes back unchanged.

``renumber=False`` keeps the original numbers on their blocks instead (for applications that map citations
back to sources by number), at the price of renderings that depend on the retriever's numbering. An edit may
carry its own choice as a third element, ``(group, order, renumber)``: one request can then renumber one group
and move another's blocks *with their own labels* (see :mod:`gateway.planning.intercept.meaning`).

The optional relevance annotation restates the retriever's order after a reordered group, in the group's own
numbering, e.g. ``Relevance order: [3] > [1] > [2]`` (the first entry is the label that the originally
first, most relevant, block now carries). It is inserted after the group (after the wrapper's closing tag when
the group fills one), never inside it, so the cached prefix is unaffected; JSON groups never get one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gateway.planning.intercept.groups import BlockGroup

__all__ = ["Edit", "relevance_line", "splice", "splice_all"]

Edit = tuple[BlockGroup, Sequence[int]] | tuple[BlockGroup, Sequence[int], bool]
"""``(group, order)``, or ``(group, order, renumber)`` to override :func:`splice_all`'s ``renumber`` for one group."""


def _check_order(group: BlockGroup, order: Sequence[int]) -> None:
    if len(order) != len(group.blocks) or set(order) != set(range(len(group.blocks))):
        raise ValueError(f"order must be a permutation of range({len(group.blocks)}), got {list(order)!r}")


def _label(group: BlockGroup, number: int) -> str:
    if group.format == "numbered":
        return group.label.rstrip(".):").replace("#", str(number))
    return str(number)


def relevance_line(group: BlockGroup, order: Sequence[int], *, renumber: bool = True) -> str:
    """Return the line that lists, in the original (relevance) order, the labels the blocks carry after ``order``.

    With ``renumber=False`` the blocks keep their original numbers, so the line lists those in their new order.
    """
    _check_order(group, order)
    if group.number_base is not None and not renumber:
        # the labels travel with the blocks, so the original order is simply the original numbers
        labels = (_label(group, group.number_base + index) for index in range(len(order)))
        return f"Relevance order: {' > '.join(labels)}"
    position = [0] * len(order)
    for new, old in enumerate(order):
        position[old] = new
    base = 1 if group.number_base is None else group.number_base
    ranking = " > ".join(_label(group, base + position[old]) for old in range(len(order)))
    if group.number_base is None:
        return f"Relevance order (by position): {ranking}"
    return f"Relevance order: {ranking}"


def _render(pieces: list[str], text: str, group: BlockGroup, order: Sequence[int], renumber: bool) -> None:
    blocks = group.blocks
    base = group.number_base if renumber else None
    last = len(blocks) - 1
    for pos, index in enumerate(order):
        pieces.append(blocks[index].render(text, None if base is None else base + pos))
        if pos < last:
            pieces.append(text[blocks[pos].end : blocks[pos + 1].start])


def _annotation(text: str, group: BlockGroup, order: Sequence[int], renumber: bool) -> str:
    after = group.after if group.after is not None else group.end
    line = f"\n{relevance_line(group, order, renumber=renumber)}"
    return line if after == len(text) or text.startswith(("\n", "\r\n"), after) else f"{line}\n"


def splice_all(
    text: str,
    edits: Iterable[Edit],
    *,
    annotate: bool = False,
    renumber: bool = True,
) -> str:
    """Return ``text`` with each group's blocks in its new order; the groups must not overlap.

    With ``annotate``, a :func:`relevance_line` follows every group whose order changed and that allows one.
    With ``renumber=False`` position-dependent numbers travel with their blocks instead of being rewritten:
    citations such as ``[2]`` elsewhere in the conversation keep pointing at the same document, but a block
    then renders identically across requests only when it keeps its number.
    """
    ordered = sorted(edits, key=lambda edit: edit[0].start)
    pieces: list[str] = []
    pos = 0
    default = renumber
    for edit in ordered:
        group, order = edit[0], edit[1]
        renumber = edit[2] if len(edit) == 3 else default
        _check_order(group, order)
        if group.start < pos:
            raise ValueError("groups overlap")
        pieces.append(text[pos : group.start])
        _render(pieces, text, group, order, renumber)
        pos = group.end
        if annotate and group.after is not None and list(order) != list(range(len(order))):
            pieces.append(text[pos : group.after])
            pieces.append(_annotation(text, group, order, renumber))
            pos = group.after
    pieces.append(text[pos:])
    return "".join(pieces)


def splice(text: str, group: BlockGroup, order: Sequence[int], *, annotate: bool = False, renumber: bool = True) -> str:
    """Return ``text`` with ``group``'s blocks in ``order`` (see :func:`splice_all`)."""
    return splice_all(text, [(group, order)], annotate=annotate, renumber=renumber)
