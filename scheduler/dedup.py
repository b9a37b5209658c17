"""Multi-turn document dedup (the semantics of ContextPilot's ``/deduplicate``).

A conversation is a chain of requests linked by ``parent_request_id``. For a new turn, documents already sent
earlier in the chain are *overlapping* (the caller may replace them by a short reference hint) and the others
are *new*. Each request keeps the union of its chain's documents, mapped to where each was first sent, so a
call costs O(documents in the conversation) instead of walking the chain (the reference walks it on every
turn: O(turns x documents)). Requests are held in an LRU cache of bounded size; a request whose parent has been
forgotten (evicted, never seen) starts a new conversation, so dedup never refers to text the model cannot see.

Hint templates may use ``{doc_id}``, ``{turn_number}`` (the turn the document was first sent in) and
``{source_request}`` (the request that sent it), and ``{{``/``}}`` for literal braces. Only these are substituted:
a template is client input and never goes through ``str.format``, which can reach object attributes.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import LRUCache

__all__ = ["DEFAULT_HINT_TEMPLATE", "ConversationTracker", "DedupResult", "render_hint"]

DEFAULT_HINT_TEMPLATE = "Please refer to [Doc {doc_id}] from the previous conversation turn."
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(doc_id|turn_number|source_request)\}")

D = TypeVar("D", bound=Hashable)


@dataclass(frozen=True, slots=True)
class DedupResult(Generic[D]):
    """The outcome for one turn. ``deduplicated_docs`` (what to send in full) equals ``new_docs``; one hint
    per overlapping document, in the same order."""

    request_id: str
    parent_request_id: str | None
    turn_number: int
    is_new_conversation: bool
    original_docs: list[D]
    deduplicated_docs: list[D]
    overlapping_docs: list[D]
    new_docs: list[D]
    reference_hints: list[str]


class _Turn(Generic[D]):
    __slots__ = ("seen", "turn")

    def __init__(self, seen: dict[D, tuple[str, int]], turn: int) -> None:
        self.seen = seen  # document -> (request that first sent it, its turn number)
        self.turn = turn


def render_hint(template: str, doc_id: Hashable, turn_number: int, source_request: str) -> str:
    """Fill the three known placeholders of ``template`` (``{{``/``}}`` escape braces, as in ``str.format``);
    any other ``{...}`` is left as written."""
    values = {"doc_id": str(doc_id), "turn_number": str(turn_number), "source_request": source_request}

    def substitute(found: re.Match[str]) -> str:
        name = found.group(1)
        return values[name] if name else found.group(0)[0]

    return _PLACEHOLDER.sub(substitute, template)


class ConversationTracker(Generic[D]):
    """Per-request document history for multi-turn dedup; bounded LRU; single writer, not locked."""

    def __init__(self, max_requests: int = 100_000) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be positive")
        self._turns: LRUCache[str, _Turn[D]] = LRUCache(maxsize=max_requests)

    def __len__(self) -> int:
        return len(self._turns)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._turns

    def turn_number(self, request_id: str) -> int | None:
        turn = self._turns.get(request_id)
        return turn.turn if turn is not None else None

    def deduplicate(
        self,
        request_id: str,
        docs: Sequence[D],
        parent_request_id: str | None = None,
        hint_template: str | None = None,
    ) -> DedupResult[D]:
        """Split ``docs`` into documents sent earlier in the parent chain and new ones; register the turn.

        Registering an id again replaces its earlier record.
        """
        parent = self._turns.get(parent_request_id) if parent_request_id is not None else None
        template = DEFAULT_HINT_TEMPLATE if hint_template is None else hint_template
        seen: dict[D, tuple[str, int]] = dict(parent.seen) if parent is not None else {}
        number = parent.turn + 1 if parent is not None else 1
        overlapping: list[D] = []
        new: list[D] = []
        hints: list[str] = []
        for doc in docs:
            source = seen.get(doc) if parent is not None else None
            if source is not None and source[1] < number:
                overlapping.append(doc)
                hints.append(render_hint(template, doc, source[1], source[0]))
            else:
                new.append(doc)
                seen.setdefault(doc, (request_id, number))
        self._turns[request_id] = _Turn(seen, number)
        return DedupResult(
            request_id=request_id,
            parent_request_id=parent_request_id,
            turn_number=number,
            is_new_conversation=parent is None,
            original_docs=list(docs),
            deduplicated_docs=list(new),
            overlapping_docs=overlapping,
            new_docs=new,
            reference_hints=hints,
        )

    def clear(self, request_id: str) -> bool:
        """Forget one request (its descendants keep their own history); return whether it was known."""
        return self._turns.pop(request_id, None) is not None

    def reset(self) -> None:
        self._turns.clear()
