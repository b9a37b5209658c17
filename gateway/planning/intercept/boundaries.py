"""Document boundaries inside template contexts, learned from traffic.

A LangChain stuff chain joins documents with ``"\\n\\n"`` and adds no marker, and a document may itself hold
blank lines, so one prompt cannot tell a boundary between two documents from a blank line inside one.
Retrievers return the same chunks verbatim, though, so traffic can: if paragraph ``a`` is followed by ``b`` in
this request, and ``a`` has been seen followed by something else (another paragraph, or the end of a context)
*and* ``b`` has been seen preceded by something else (or at the start of a context), then ``a`` ends a chunk and
``b`` starts one, and the blank line between them is a boundary. Both sides are required: a paragraph shared
by two chunks (a chunk overlap, a repeated heading) then does not confirm a boundary on its own.

The candidates are the paragraphs of a ``:paragraphs`` template group (see
:mod:`gateway.planning.intercept.templates`); a run of them whose inner blank lines are not confirmed moves as one
block, and a group with no confirmed boundary is left alone. Decisions use only what earlier requests
showed, so the first request that carries a chunk never splits it. What a request shows is recorded after it
has been decided.

Knowledge is kept per template slot: the template's name and the text before its context (the instructions
and system prompt around it), so two applications sharing a template do not teach each other. Memory is a
bounded LRU map from (slot, paragraph) digests to the paragraph's first neighbour on each side and whether
another was seen; the least recently seen paragraphs are forgotten first.

Where it can be wrong: chunks ``[a, b]``, ``[a, c]`` and ``[d, b]`` (two paragraphs each reused in other
chunks) are indistinguishable from four one-paragraph chunks; a boundary between ``a`` and ``b`` is then
confirmed and ``[a, b]`` can be split. Unique paragraphs, overlapping chunks and shared headings are safe.
"""

from __future__ import annotations

import threading
from hashlib import blake2b

from cachetools import LRUCache

from gateway.planning.intercept.groups import Block, BlockGroup
from gateway.planning.intercept.templates import TEMPLATES

__all__ = ["Boundaries"]

_START = -1
_END = -2
_SUFFIX = ":paragraphs"
# where the fixed text ends in templates that put the query before the context (rag_prompt: "...\nQuestion: ")
_QUERY_AFTER = {template.name: template.anchor[-40:].strip() for template in TEMPLATES if template.opener}


class _Seen:
    """One paragraph's first neighbours on each side, and whether a different one was seen since."""

    __slots__ = ("after", "before", "other_after", "other_before")

    def __init__(self, before: int, after: int) -> None:
        self.before = before
        self.after = after
        self.other_before = False
        self.other_after = False


class Boundaries:
    """Learns which blank lines of template contexts separate documents, and regroups paragraphs by them."""

    def __init__(self, max_paragraphs: int = 100_000) -> None:  # about 300 bytes each: ~30 MB
        self._seen: LRUCache[bytes, _Seen] = LRUCache(maxsize=max_paragraphs)
        self._lock = threading.Lock()  # big prompts are planned on worker threads

    def __len__(self) -> int:
        return len(self._seen)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def regroup(self, text: str, groups: list[BlockGroup], tenant: bytes = b"") -> list[BlockGroup]:
        """Replace each ``:paragraphs`` group by its learned grouping (or drop it); keep every other group.

        ``tenant``: the client key's namespace when planning state is per key: what one key's traffic
        confirmed never splits another key's documents (that would tell it which chunks others sent)."""
        out: list[BlockGroup] = []
        for group in groups:
            if not group.label.endswith(_SUFFIX):
                out.append(group)
            elif (learned := self.learn(text, group, tenant)) is not None:
                out.append(learned)
        return out

    def learn(self, text: str, group: BlockGroup, tenant: bytes = b"") -> BlockGroup | None:
        """Decide ``group``'s documents from earlier traffic, then record what this request shows.

        Returns the group with one block per run of paragraphs between confirmed boundaries (label
        ``<template>:learned``), or None when no boundary is confirmed yet.
        """
        slot = _slot(text, group, tenant)
        keys = [
            blake2b(block.key(text).encode("utf-8", "surrogatepass"), digest_size=16, key=slot).digest()
            for block in group.blocks
        ]
        ids = [int.from_bytes(key[:8], "big") >> 1 for key in keys]  # >= 0, apart from the sentinels
        with self._lock:
            cuts = self._record(keys, ids)
        if not any(cuts):
            return None
        blocks: list[Block] = []
        first = group.blocks[0]
        for i, cut in enumerate(cuts):
            if cut:
                end = group.blocks[i].end
                blocks.append(Block(first.start, end, first.start, end))
                first = group.blocks[i + 1]
        last = group.blocks[-1].end
        blocks.append(Block(first.start, last, first.start, last))
        label = group.label[: -len(_SUFFIX)] + ":learned"
        return BlockGroup(group.format, label, tuple(blocks), None, group.after)

    def _record(self, keys: list[bytes], ids: list[int]) -> list[bool]:
        """Decide each inner blank line from what earlier requests showed, then record this request."""
        seen = self._seen
        records = [seen.get(key) for key in keys]
        cuts = [_parted(records[i], records[i + 1], ids[i], ids[i + 1]) for i in range(len(ids) - 1)]
        for i, key in enumerate(keys):
            before = ids[i - 1] if i else _START
            after = ids[i + 1] if i + 1 < len(ids) else _END
            record = seen.get(key)  # not records[i]: a paragraph may occur twice in one context
            if record is None:
                seen[key] = _Seen(before, after)
                continue
            record.other_before |= record.before != before
            record.other_after |= record.after != after
        return cuts


def _parted(left: _Seen | None, right: _Seen | None, left_id: int, right_id: int) -> bool:
    """Whether ``left`` has been seen followed by another than ``right``, and ``right`` preceded by another."""
    if left is None or right is None:
        return False
    return (left.other_after or left.after != right_id) and (right.other_before or right.before != left_id)


def _slot(text: str, group: BlockGroup, tenant: bytes = b"") -> bytes:
    """The template slot: its tenant, name and the text before its context, without a query placed before it."""
    name = group.label[: -len(_SUFFIX)]
    before = text[: group.start]
    fixed = _QUERY_AFTER.get(name)
    if fixed is not None and (cut := before.find(fixed)) >= 0:
        before = before[: cut + len(fixed)]
    digest = blake2b(tenant + b"\0" + f"{group.format}|{name}|".encode(), digest_size=16)
    digest.update(before.encode("utf-8", "surrogatepass"))
    return digest.digest()
