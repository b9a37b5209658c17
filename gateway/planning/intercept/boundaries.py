"""Document boundaries inside template contexts, learned from traffic.

A LangChain stuff chain joins documents with ``"\\n\\n"`` and adds no marker, and a document may itself hold
blank lines, so one prompt cannot tell a boundary between two documents from a blank line inside one.
Retrievers return the same chunks verbatim, though, so traffic can: if paragraph ``a`` is followed by ``b`` in
this request, and ``a`` has been seen followed by something else (another paragraph, or the end of a context)
*and* ``b`` has been seen preceded by something else (or at the start of a context), then ``a`` ends a chunk and
``b`` starts one, and the blank line between them is a boundary. Both sides are required: a paragraph shared
by two chunks (a chunk overlap, a repeated heading) then does not confirm a boundary on its own.

When one side of a blank line is new, the other side can still show a boundary, from runs of paragraphs seen
before; a run of three is needed where two could be a text splitter's overlap (the last two paragraphs of one
window opening the next). ``a`` ends a chunk before a new ``b``:

- when the three paragraphs ending with ``a`` (``y, z, a``) closed a context, or a block at a boundary confirmed
  then. A window overlap of up to two paragraphs is not taken for this: where the next window opens with ``z, a``,
  they follow another paragraph than ``y``. Three paragraphs seen anywhere are not enough: a heading that every
  chunk of a file opens with (LlamaIndex's ``file_path: ...``) goes on otherwise after the same chunk too;
- or when ``z, a`` closed a context after a paragraph ``y`` seen without ``z`` after it (or at the context's
  start): ``z, a`` was then a run of whole chunks, where an overlap's ``y`` is always followed by ``z``.

Mirrored, ``b`` starts a chunk after a new ``a`` when a context opened with ``b`` and the two after it, or with
``b, c`` followed by a paragraph seen after another than ``c`` (or by the context's end). A chunk of one paragraph
is cut this way only where it was seen whole (a whole context, or a block between a context's edge and a boundary,
or between two). Nor is a paragraph cut from both its neighbours unless it was seen whole: else it stays with the
paragraph after it (a heading that opens several chunks, over a body another chunk shares under its own heading,
would otherwise go out cut from its body, which the two-sided rule alone cannot tell from two one-paragraph
chunks). Runs are only taken where they opened or closed a context or a
block: two chunks with the same body under different titles (``bisect`` and ``bisect_right``) never lose their
titles, and two that open with the same heading never lose their heading.

Traffic is weighed, not just seen: a chunk shown whole is evidence too. Each paragraph counts the requests
that showed it, and each adjacent pair the requests that showed it in that order; once ``a`` has been seen directly
followed by ``b`` (the chunk ``a\n\nb`` shown whole, in this order), the blank line between them is cut only
when ``a`` was seen without ``b`` after it, and ``b`` without ``a`` before it, more often than together. So
two requests ``[a, x]`` and ``[y, b]`` no longer make another client's ``a\n\nb`` go out as ``b ... a``:
that takes more requests apart than the chunk was sent whole, and every further request of the chunk sent whole
raises the bar. A request shows a pair together only where it was not cut there: once a boundary is confirmed,
the same two documents retrieved next to each other again (a retriever ranks them alike for the next question)
are no evidence of one chunk, and the boundary holds. Counted, one such request would undo the boundary, and the
next request of the same documents would go out as the client sent them, not in the order the engine holds from
the one before (``bench apps``, the custom user template at seed 2: 0.84x direct's cached share, now 1.27x). The
price: a chunk once cut, by shared paragraphs or by a client's traffic, stays cut while the counts that cut it
stand; its requests no longer heal it. With client keys (and no ``--shared-cache``) every key learns alone, so
one key's traffic never changes how another key's text is cut. With keys and ``--shared-cache`` the keys learn
together, and a boundary is weighed in distinct keys instead of requests (``client``): paragraphs shown apart by
one key, however often, count once, so it takes more keys showing them apart than keys showing the chunk whole.
Without keys the gateway cannot tell clients apart: a client that sends a chunk's paragraphs apart often enough,
or before the chunk was ever sent whole, can still get it cut (the blocks then move apart; no byte changes).

The candidates are the paragraphs of a ``:paragraphs`` template group (see
:mod:`gateway.planning.intercept.templates`); a run of them whose inner blank lines are not confirmed moves as one
block, and a group with no confirmed boundary is left alone. Decisions use only what earlier requests
showed, so the first request that carries a chunk never splits it. What a request shows is recorded after it
has been decided.

A template learned from traffic (format ``learned``: the paragraphs after a text's first) has no known edges.
Its last paragraph is left out of the context once it starts as the last paragraphs of the slot's last three
requests did, on at least 24 characters (``Using only the material above, answer: {question}``); and the runs
before the first and after the last confirmed boundary stay in place unless their outer paragraph was seen
elsewhere (after, before another): a line that changes daily before the documents, or the question, never moves.

Knowledge is kept per template slot: the template's name and the text before its context (the instructions
and system prompt around it), so two applications sharing a template do not teach each other. Memory is two
bounded LRU maps of counts, from (slot, paragraph) digests and from (paragraph, next paragraph) digests (the last
three of every block and a context's first three counted there too); two maps a quarter of their size, from a
context's first (last) two paragraphs to the one after (before) them there; and two maps a sixteenth of their size
per slot (its requests; a learned template's tail); the least recently seen are forgotten first.

Where it can be wrong: chunks ``[a, b]``, ``[a, c]`` and ``[d, b]`` (two paragraphs each reused in other
chunks, like the ``json`` docs of ``dump`` and ``dumps``) are indistinguishable from four one-paragraph
chunks; a boundary between ``a`` and ``b`` is then confirmed once ``[a, c]`` and ``[d, b]`` were each seen
more often than ``[a, b]``, and a request of ``[a, b]`` can be split where ``a`` opens the context or follows a
paragraph it is not cut from, or once ``a`` was seen as a block of its own. Before ``[a, b]`` was seen at all,
traffic that shows ``a`` and ``b`` apart can split its first request (there is nothing to weigh it against), and
so can a context or block that closed with the three paragraphs ending with ``a``.
Unique paragraphs, windows overlapping by up to two paragraphs and shared headings are safe.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from hashlib import blake2b
from os.path import commonprefix
from typing import NamedTuple

from cachetools import LRUCache

from gateway.planning.intercept.groups import Block, BlockGroup
from gateway.planning.intercept.templates import LEARNED, TEMPLATES

__all__ = ["Boundaries", "Shown"]


class Shown(NamedTuple):
    """What one request shows of its template contexts (``Boundaries.read``): the slot and the paragraph keys of
    each, and the client that sent it when clients are told apart (``client``)."""

    contexts: tuple[tuple[bytes, list[bytes], tuple[int, ...]], ...]  # slot, paragraph keys, the blocks' last ones
    client: str | None = None
    tails: tuple[tuple[bytes, str], ...] = ()  # a learned template's slot and the start of its last paragraph


_MAX_COUNT = 1 << 30
_MAX_CLIENTS = 4  # distinct clients remembered per paragraph and per pair (counts saturate there)
_FIXED_AFTER = 1  # requests that must show a paragraph at the same edge before it counts as the template's
_SUFFIX = ":paragraphs"
_TAIL_CHARS = 96  # how much of a learned template's last paragraph is compared with the slot's earlier ones
_TAIL_MIN = 24  # the least common start that makes it the template's own (a question after a fixed lead-in)
_TAIL_AFTER = 2  # requests after the first that must share it
_EDGE = b"\0" * 16  # the start or the end of a context, as a neighbour
# where the fixed text ends in templates that put the query before the context (rag_prompt: "...\nQuestion: ")
_QUERY_AFTER = {template.name: template.anchor[-40:].strip() for template in TEMPLATES if template.opener}


class Boundaries:
    """Learns which blank lines of template contexts separate documents, and regroups paragraphs by them."""

    def __init__(self, max_paragraphs: int = 100_000) -> None:  # two counts of ~250 bytes each: ~50 MB
        self._seen: LRUCache[bytes, int] = LRUCache(maxsize=max_paragraphs)  # paragraph -> times seen
        self._pairs: LRUCache[bytes, int] = LRUCache(maxsize=max_paragraphs)  # (a, b) -> times a then b
        self._slots: LRUCache[bytes, int] = LRUCache(maxsize=max(1, max_paragraphs // 16))  # slot -> requests
        # a learned template's slot -> the start its last paragraphs share, and how many requests after the first did
        self._tails: LRUCache[bytes, tuple[str, int]] = LRUCache(maxsize=max(1, max_paragraphs // 16))
        # with clients told apart: the distinct clients (interned digests, at most _MAX_CLIENTS) that showed each;
        # filled only when keys share the planning state: ~28 MB for the two at 50,000 entries each (a forgotten
        # entry counts no client: fewer cuts, never more)
        self._seen_by: LRUCache[bytes, tuple[str, ...]] = LRUCache(maxsize=max(1, max_paragraphs // 2))
        self._pairs_by: LRUCache[bytes, tuple[str, ...]] = LRUCache(maxsize=max(1, max_paragraphs // 2))
        # a context's first (last) two paragraphs -> the paragraph after (before) them there, or _EDGE: ~10 MB
        self._after_opening: LRUCache[bytes, bytes] = LRUCache(maxsize=max(1, max_paragraphs // 4))
        self._before_closing: LRUCache[bytes, bytes] = LRUCache(maxsize=max(1, max_paragraphs // 4))
        self._lock = threading.Lock()  # big prompts are planned on worker threads

    def __len__(self) -> int:
        return len(self._seen)

    def clear(self) -> None:
        with self._lock:
            for counts in (self._seen, self._pairs, self._slots, self._seen_by, self._pairs_by, self._tails,
                           self._after_opening, self._before_closing):  # fmt: skip
                counts.clear()

    def regroup(
        self, text: str, groups: list[BlockGroup], tenant: bytes = b"", client: bytes | None = None
    ) -> list[BlockGroup]:
        """Replace each ``:paragraphs`` group by its learned grouping (or drop it); keep every other group; then
        record what the text shows (``read`` and ``record`` in one).

        ``tenant``: the client key's namespace when planning state is per key: what one key's traffic
        confirmed never splits another key's documents (that would tell it which chunks others sent).
        ``client``: the key's identity when keys share the planning state (``--shared-cache``): evidence is then
        counted in distinct clients, not requests, so that no one key can confirm a boundary by itself."""
        found, shown = self.read(text, groups, tenant, client)
        self.record(shown)
        return found

    def read(
        self, text: str, groups: Sequence[BlockGroup], tenant: bytes = b"", client: bytes | None = None
    ) -> tuple[list[BlockGroup], Shown]:
        """``regroup``'s groups, decided from earlier traffic only, and what the text shows, for ``record`` once the
        request is planned (reads the counts, changes nothing)."""
        out: list[BlockGroup] = []
        shown: list[tuple[bytes, list[bytes], tuple[int, ...]]] = []
        tails: list[tuple[bytes, str]] = []
        for found in groups:
            if not found.label.endswith(_SUFFIX):
                out.append(found)
                continue
            slot = _slot(text, found, tenant)
            group = found
            if found.format == LEARNED:
                group, tail = self._without_tail(text, found, slot)
                tails.append((slot, tail))
            learned, keys, ends = self._learn(text, group, slot, by_client=client is not None)
            shown.append((slot, keys, ends))
            if learned is not None:
                out.append(learned)
        return out, Shown(tuple(shown), _client_digest(client), tuple(tails))

    def _without_tail(self, text: str, group: BlockGroup, slot: bytes) -> tuple[BlockGroup, str]:
        """A learned template's candidate without its last paragraph when that starts as the slot's last paragraphs
        have (``Reference material above, answer: {question}``: the template's, after its context); and the start
        of that paragraph, for ``record``."""
        last = group.blocks[-1]
        tail = text[last.start : min(last.end, last.start + _TAIL_CHARS)]
        with self._lock:
            known = self._tails.get(slot)
        if known is None or known[1] < _TAIL_AFTER or not tail.startswith(known[0]) or len(group) - 1 in group.joined:
            return group, tail
        blocks = group.blocks[:-1]
        joined = tuple(i for i in group.joined if i < len(blocks))
        return BlockGroup(group.format, group.label, blocks, None, blocks[-1].end, joined), tail

    def record(self, shown: Shown) -> None:
        """Count what a planned request showed (``read``'s second value): its template slots, and each paragraph and
        each adjacent pair, once per request."""
        with self._lock:
            for slot in dict.fromkeys(slot for slot, _, _ in shown.contexts):
                self._slots[slot] = min(self._slots.get(slot, 0) + 1, _MAX_COUNT)
            for _, keys, ends in shown.contexts:
                self._count(keys, ends, shown.client)
            for slot, tail in shown.tails:
                known = self._tails.get(slot)
                shared = "" if known is None else commonprefix([known[0], tail])  # noqa: RUF071 (text, not paths)
                self._tails[slot] = (shared, known[1] + 1) if known and len(shared) >= _TAIL_MIN else (tail, 0)

    def _learn(
        self, text: str, group: BlockGroup, slot: bytes, *, by_client: bool
    ) -> tuple[BlockGroup | None, list[bytes], tuple[int, ...]]:
        """The group with one block per run of paragraphs between confirmed boundaries (label
        ``<template>:learned``), or None when no boundary is confirmed yet; the paragraphs' keys; and the
        paragraphs after which a boundary was confirmed."""
        keys = [
            blake2b(block.key(text).encode("utf-8", "surrogatepass"), digest_size=16, key=slot).digest()
            for block in group.blocks
        ]
        with self._lock:
            cuts, first_fixed, last_fixed = self._decide(
                keys, self._slots.get(slot, 0), by_client=by_client, learned=group.format == LEARNED
            )
        for index in group.joined:  # a continuation is never cut from the paragraph before it
            cuts[index - 1] = False
        ends = tuple(i for i, cut in enumerate(cuts) if cut)
        # the template's own text stays out of the group, with the run of paragraphs it is not cut from
        head = ends[0] + 1 if first_fixed and ends else 0
        stop = ends[-1] + 1 if last_fixed and ends else len(group.blocks)  # the paragraphs kept: [head, stop)
        if stop - head < 2 or not any(cuts[head : stop - 1]):
            return None, keys, ends
        blocks: list[Block] = []
        first = group.blocks[head]
        for i in range(head, stop - 1):
            if cuts[i]:
                end = group.blocks[i].end
                blocks.append(Block(first.start, end, first.start, end))
                first = group.blocks[i + 1]
        last = group.blocks[stop - 1].end
        blocks.append(Block(first.start, last, first.start, last))
        label = group.label[: -len(_SUFFIX)] + ":learned"
        return BlockGroup(group.format, label, tuple(blocks), None, last), keys, ends

    def _decide(
        self, keys: list[bytes], requests: int, *, by_client: bool, learned: bool = False
    ) -> tuple[list[bool], bool, bool]:
        """Decide each inner blank line from what earlier requests showed (``requests`` of them in the slot); with
        ``by_client``, from how many distinct clients showed it.

        Also returns whether the first and the last paragraph may be the template's own text: seen first
        (last) in every request that showed it, and in at least half of the slot's requests, it may be written
        by the application around its documents ("Always answer in English."); it then stays where it is, with
        the paragraphs it is not cut from. A document that a retriever happened to rank first in a few of many
        requests is not held back as the template's text.

        In a template learned from traffic (``learned``) the text around the context is not known: the first
        (last) paragraph stays where it is unless it was seen after (before) another: an instruction that changes
        daily or the question is not, a document is."""
        seen, pairs = self._seen, self._pairs
        pair_keys = _pairs_of(keys)
        apart: _Tally = self._seen_by if by_client else seen
        together: _Tally = self._pairs_by if by_client else pairs
        cuts = []
        for i in range(len(keys) - 1):
            left, right = _tally(apart, keys[i]), _tally(apart, keys[i + 1])
            cut = _parted(left, right, _tally(together, pair_keys[i + 1]))
            if not cut and right == 0 and left:  # the next paragraph is new: does this one end a chunk?
                cut = self._ends(keys, i, apart, together)
            elif not cut and left == 0 and right:  # this paragraph is new: does the next one start a chunk?
                cut = self._starts(keys, i + 1, apart, together)
            cuts.append(cut)
        for i in range(1, len(keys) - 1):  # a paragraph cut from both neighbours: a chunk of one paragraph?
            if cuts[i - 1] and cuts[i] and not _tally(together, _whole(keys[i])):
                cuts[i] = False  # never seen whole on its own: it stays with the paragraph after it
        # the application's own text: by requests, whoever sent them (holding a paragraph back never cuts one)
        first_fixed = _fixed(seen.get(keys[0], 0), pairs.get(pair_keys[0], 0), requests)
        last_fixed = _fixed(seen.get(keys[-1], 0), pairs.get(pair_keys[-1], 0), requests)
        if learned:
            first_fixed = first_fixed or seen.get(keys[0], 0) <= pairs.get(pair_keys[0], 0)
            last_fixed = last_fixed or seen.get(keys[-1], 0) <= pairs.get(pair_keys[-1], 0)
        return cuts, first_fixed, last_fixed

    def _ends(self, keys: list[bytes], i: int, apart: _Tally, together: _Tally) -> bool:
        """Whether paragraph ``i`` ends a chunk, the next one being new: the three paragraphs ending with it closed a
        context or a block; or the two ending with it closed a context whose paragraph before them was a boundary (a
        context's start, or seen without them). A chunk that opens with another one's last two paragraphs (a window
        overlap) is not cut: there they follow the one before them. A paragraph first in its context ends a chunk
        only where it was seen whole (a context, or a block, of that one paragraph)."""
        if i >= 2 and _tally(together, _closing(keys, i)) > 0:
            return True
        if i == 0:
            return _tally(together, _whole(keys[0])) > 0
        before = self._before_closing.get(_pair(keys[i - 1], keys[i]))
        return before is not None and (before == _EDGE or _alone(before, _pair(before, keys[i - 1]), apart, together))

    def _starts(self, keys: list[bytes], i: int, apart: _Tally, together: _Tally) -> bool:
        """Whether paragraph ``i`` starts a chunk, the one before being new: a context opened with it and the two
        after it; or with it and the next, followed by a boundary (the context's end, or a paragraph parted from
        them). A chunk that ends with another one's first two paragraphs (a window overlap) is not cut."""
        last = len(keys) - 1
        if i + 2 <= last and _tally(together, _pair(_EDGE, _pair(keys[i], _pair(keys[i + 1], keys[i + 2])))) > 0:
            return True
        if i == last:
            return _tally(together, _whole(keys[i])) > 0
        after = self._after_opening.get(_pair(keys[i], keys[i + 1]))
        return after is not None and (after == _EDGE or _alone(after, _pair(keys[i + 1], after), apart, together))

    def _count(self, keys: list[bytes], ends: tuple[int, ...], client: str | None) -> None:
        # counted per request, not per occurrence: a paragraph repeated inside one document is not evidence
        # that it was seen apart from its neighbour; and per distinct client, when clients are told apart
        closed = dict.fromkeys(i for i in (*ends, len(keys) - 1) if i >= 2)  # a block's last three, where it ended
        cut = set(ends)  # a pair cut in this request was not shown together: two blocks that happen to be adjacent
        pair_keys = [pair for j, pair in enumerate(_pairs_of(keys)) if j - 1 not in cut]
        pair_keys += [_closing(keys, i) for i in closed]
        if len(keys) > 1:
            edged = [_EDGE, *keys, _EDGE]
            pair_keys.append(_pair(_EDGE, _pair(keys[0], _pair(*edged[2:4]))))
            self._after_opening[_pair(keys[0], keys[1])] = edged[3]
            self._before_closing[_pair(keys[-2], keys[-1])] = edged[-4]
        # a paragraph that was a block on its own (between the context's edges and the cuts)
        bounds = {-1, len(keys) - 1} | cut
        pair_keys += [_whole(keys[i]) for i in range(len(keys)) if i - 1 in bounds and i in bounds]
        for counts, counted in ((self._seen, keys), (self._pairs, pair_keys)):
            for key in dict.fromkeys(counted):
                counts[key] = min(counts.get(key, 0) + 1, _MAX_COUNT)
        if client is not None:
            for clients, counted in ((self._seen_by, keys), (self._pairs_by, pair_keys)):
                for key in dict.fromkeys(counted):
                    known = clients.get(key, ())
                    if client not in known and len(known) < _MAX_CLIENTS:
                        clients[key] = (*known, client)


_Tally = LRUCache[bytes, int] | LRUCache[bytes, tuple[str, ...]]


def _tally(counts: _Tally, key: bytes) -> int:
    """Requests that showed ``key``, or the distinct clients that did."""
    value = counts.get(key, 0)
    return value if isinstance(value, int) else len(value)


def _client_digest(client: bytes | None) -> str | None:
    """A short name for a client, interned: every entry that remembers the client shares one string."""
    return None if client is None else sys.intern(blake2b(client, digest_size=8, person=b"pg-client").hexdigest())


def _pairs_of(keys: list[bytes]) -> list[bytes]:
    """Each adjacent pair of paragraphs, the context's edges included."""
    return [_pair(left, right) for left, right in zip([_EDGE, *keys], [*keys, _EDGE], strict=True)]


def _closing(keys: list[bytes], i: int) -> bytes:
    """Paragraph ``i`` after the two before it, ending a block (at a boundary, or at the context's end)."""
    return _pair(_pair(_pair(keys[i - 2], keys[i - 1]), keys[i]), _EDGE)


def _whole(paragraph: bytes) -> bytes:
    """A paragraph seen as a block of its own: between two cuts, or the context's edges."""
    return _pair(_pair(_EDGE, paragraph), _EDGE)


def _alone(paragraph: bytes, pair: bytes, apart: _Tally, together: _Tally) -> bool:
    """Whether ``paragraph`` was seen without the other paragraph of ``pair`` beside it."""
    return _tally(apart, paragraph) > _tally(together, pair)


def _fixed(seen: int, with_neighbour: int, requests: int) -> bool:
    """Whether a paragraph seen in ``seen`` of the slot's ``requests`` requests, at least half of them, always had
    the same neighbour on the edge side."""
    return seen >= _FIXED_AFTER and with_neighbour == seen and 2 * seen >= requests


def _pair(left: bytes, right: bytes) -> bytes:
    return blake2b(left + right, digest_size=16).digest()


def _parted(left: int, right: int, together: int) -> bool:
    """Whether paragraphs seen ``left`` and ``right`` times, ``together`` of them adjacent in this order, were
    each seen apart from the other more often than together (so at least once)."""
    return min(left, right) - together > together


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
