"""What the planner reads in a request: every text, its block groups, and the meaning cues outside them.

Meaning is decided from the whole request (:mod:`gateway.planning.intercept.meaning`), so every text is read, whatever
its role: groups are looked for in the texts in scope, cues (``source [3]``, "cite them as [n]", "ranked by
relevance") everywhere outside the groups. Both are memoised by the text's digest and the options that find
groups: the texts a conversation resends turn after turn cost one hash each.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b

from cachetools import LRUCache

from gateway.errors import InvalidRequest
from gateway.planning.control import Control
from gateway.planning.intercept import BlockGroup, find_groups
from gateway.planning.intercept.boundaries import Shown
from gateway.planning.intercept.meaning import NO_OTHERS, Decision, Others, RequestCues, TextCues, scan
from gateway.planning.intercept.templates import LEARNED
from gateway.wire.chat import ChatMessage, RequestBody

__all__ = ["Meaning", "Reading", "TextScan", "TextScans", "chat_texts", "groups_in"]


@dataclass(frozen=True, slots=True)
class TextScan:
    """One text's block groups (None: out of scope, not looked for) and the cues outside them, under ``key``:
    a digest of the text and of the options that find its groups."""

    key: bytes
    groups: tuple[BlockGroup, ...] | None
    cues: TextCues

    def size(self) -> int:
        return 8 + sum(len(group) for group in self.groups or ()) + len(self.cues.found)


class TextScans:
    """Memoised :class:`TextScan` per text, bounded by the blocks and cues held (big prompts are planned in a
    worker thread: the memo is guarded by a lock, the scan itself runs outside it)."""

    def __init__(self, units: int = 1 << 16) -> None:
        self._memo: LRUCache[bytes, TextScan] = LRUCache(maxsize=units, getsizeof=TextScan.size)
        self._lock = threading.Lock()

    def get(self, text: str, control: Control, in_scope: bool, deadline: float | None = None) -> TextScan:
        digest = blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, person=b"scan")
        digest.update(control.signature() + (b"|s" if in_scope else b"|o"))
        key = digest.digest()
        with self._lock:
            found = self._memo.get(key)
        if found is None:
            groups = tuple(groups_in(text, control, deadline)) if in_scope else None
            # a learned template's candidate may hold the question itself: its cues are read (and a cue inside
            # the blocks that end up moving still never counts for them: ``meaning.decide``)
            skip = [(group.start, group.end) for group in groups or () if group.format != LEARNED]
            cues = scan(text, labels=control.mapping, skip=skip, holds=in_scope)  # out of scope: labels nothing
            if control.mapping:
                cues = cues.with_labels(groups or ())
            found = TextScan(key, groups, cues)
            with self._lock:
                self._memo[key] = found
        return found


def groups_in(text: str, control: Control, deadline: float | None = None) -> list[BlockGroup]:
    """The block groups of one text under the request's options (a bad tag or format is a 400); past
    ``deadline`` (``time.thread_time``), ``BudgetExceeded``. Paragraph splits of template contexts
    (``:paragraphs``) are kept, and so is a learned template's candidate: the planner lets only traffic-confirmed
    boundaries through (:mod:`gateway.planning.intercept.boundaries`)."""
    try:
        return find_groups(
            text, control.mode, tag=control.tag, separator=control.separator, deadline=deadline, learn=True
        )
    except ValueError as exc:
        raise InvalidRequest(f"invalid control header: {exc}", code="invalid_header") from None


def chat_texts(messages: Sequence[ChatMessage]) -> Iterator[tuple[tuple[int, int], str, str]]:
    """Every text of a chat request, whatever its role (assistant answers cite sources too): its key (message,
    part; -1 for a string content), its role and the text."""
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, str):
            yield (i, -1), message.role, content
        elif content is not None:
            for j, part in enumerate(content):
                text = part.get("text") if part.get("type") == "text" else None
                if isinstance(text, str):
                    yield (i, j), message.role, text


@dataclass(frozen=True, slots=True)
class Meaning:
    """What one text's groups may do, decided before any index lookup: its groups once the boundaries learned
    from traffic are applied (``Boundaries.read``), the decision for each (``meaning.decide``), and what the text
    shows, for ``Boundaries.record`` once it is planned."""

    groups: tuple[BlockGroup, ...]
    decisions: tuple[Decision, ...]
    shown: Shown


@dataclass(slots=True)
class Reading:
    """A request as the planner's first phase read it (``Planner.read``), without the live index: its options,
    every text by key with its scan, the request's meaning cues, and the meaning of each text whose rewrite is not
    remembered. ``complete`` is False when reading stopped at the event loop's inline slice (the rest is read in a
    worker thread, from where it stopped); ``skipped`` is ``"budget"`` when the request's budget ran out (then
    every text goes out as it came)."""

    body: RequestBody
    headers: Mapping[str, str]
    tenant: str | None
    control: Control
    client: str | None = None  # the key, when keys share the planning state (boundaries count distinct clients)
    texts: dict[Hashable, str] = field(default_factory=dict)
    scans: dict[Hashable, TextScan] = field(default_factory=dict)
    meanings: dict[Hashable, Meaning] = field(default_factory=dict)
    cues: RequestCues | None = None  # None: a completions batch, each prompt read alone
    complete: bool = True
    skipped: str | None = None

    def others(self, key: Hashable) -> Others:
        """The cues of the request's other texts (none for a completion prompt: each is its own request)."""
        return self.cues.others(key) if self.cues is not None else NO_OTHERS
