"""Runs of whole blocks (``document`` and ``search_result`` blocks, file-search results): whether they may move,
and in which order.

A run has no labels of its own: a block's number is its position among the request's blocks of its type (what
Anthropic's ``document_index`` counts, and what a reader means by "document 3"). So the rules of
:mod:`gateway.planning.intercept.meaning` apply with every number meaning a position; from the cues of every text of the
request (:class:`~gateway.planning.intercept.meaning.Others`), a run is left alone when

- a text calls the order meaningful ("ranked by relevance", "newest first": ``ranked`` / ``chronological``), or
  the blocks themselves open with dates that run in one direction (``chronological``) or like steps ("Step 1",
  "First, ... Then, ...": ``steps``);
- a text refers to a block by position ("the second document", "the top result") or by a number up to the run's
  last position ("What does document 3 say?", "see result [2]"; the number counts blocks from 1, or 0: both are
  taken, as the reader's count cannot be known): ``referenced``;
- a text asks to cite by number ("cite them as [n]"), or by id when a block carries none (a ``title``, a
  ``file_id``, a ``filename``): the model would write positions in its text, ``cite_by_position``.

Otherwise the run is free to move. The model's *structured* citations (``document_index``,
``search_result_index``) are positions too, but they need no rule here: ``gateway.wire.citations`` maps every one
back to the client's order, in whole answers and streams, and maps citations the client resends the other way.
What it cannot map is prose: a user's "the second document" or an answer's "Document 2" in plain text, hence
these rules. Each decision is counted like a text group's (``X-Prefixgate-Result`` ``left_alone``,
``prefixgate_groups_meaning_total``), under the blocks' type as the format.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any

import msgspec
from cachetools import LRUCache

from gateway.planning.intercept.meaning import Decision, Others
from gateway.planning.intercept.ordered import dated_in_order, read_as_steps
from gateway.planning.outcome import Choice, Outcome, Prefix
from scheduler.blocks import block_id

__all__ = ["UnitOrders", "decide_run", "run_facts"]

_HEAD = 240  # the characters of a block read for a date, as for text blocks
_IDS = ("title", "file_id", "filename")
_decoder = msgspec.json.Decoder()


def decide_run(
    units: Sequence[bytes], others: Others, first: int = 0, facts: tuple[bool, bool, bool] | None = None
) -> Decision:
    """Whether the run ``units`` (blocks ``first`` .. ``first + len(units) - 1`` of their type) may move;
    ``facts``: the run's :func:`run_facts`, when the caller remembers them."""
    kinds = {kind for kind, _ in others.cues}
    if "ranked" in kinds:
        return Decision("leave_alone", "ranked")
    if "chronological" in kinds:
        return Decision("leave_alone", "chronological")
    if "pos" in kinds or any(kind == "num" and value <= first + len(units) for kind, value in others.cues):
        return Decision("leave_alone", "referenced")
    dated, stepped, named = facts if facts is not None else run_facts(units)
    if dated:
        return Decision("leave_alone", "chronological")
    if stepped:
        return Decision("leave_alone", "steps")
    if "cite" in kinds or ("cite_id" in kinds and not named):
        return Decision("leave_alone", "cite_by_position")
    return Decision("renumber")


def run_facts(units: Sequence[bytes]) -> tuple[bool, bool, bool]:
    """What the blocks themselves say: whether they open with dates in order, whether they open like steps (by
    their titles or their texts), and whether every one names itself."""
    blocks = [_decoded(unit) for unit in units]
    parts = [_parts(block) for block in blocks]
    dated = dated_in_order(f"{title}\n{body}"[:_HEAD] for title, body in parts)
    stepped = read_as_steps([(body, 0) for _, body in parts]) or read_as_steps([(title, 0) for title, _ in parts])
    return dated, stepped, all(_named(block) for block in blocks)


def _decoded(unit: bytes) -> dict[str, Any]:
    try:
        value = _decoder.decode(unit)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _parts(block: dict[str, Any]) -> tuple[str, str]:
    """The block's title and first characters (a document's source, a search result's or file result's text)."""
    source = block.get("source")
    body: Any = None
    if isinstance(source, dict) and source.get("type") in ("text", "content"):  # not a base64 file
        body = source.get("data") or source.get("content")
    body = body if body is not None else block.get("content", block.get("text"))
    if isinstance(body, list):
        body = next((b.get("text") for b in body if isinstance(b, dict) and isinstance(b.get("text"), str)), "")
    title = block.get("title")
    return (title[:_HEAD] if isinstance(title, str) else ""), (body[:_HEAD] if isinstance(body, str) else "")


def _named(block: dict[str, Any]) -> bool:
    return any(isinstance(block.get(name), str) and block[name].strip() for name in _IDS)


class UnitOrders:
    """Plans runs of whole blocks; remembers each run's order by the blocks' identities, so a resent run (a later
    turn of the same conversation) is sent in the same order."""

    def __init__(self) -> None:
        self._memo: LRUCache[bytes, tuple[int, ...]] = LRUCache(maxsize=1 << 16)
        self._facts: LRUCache[bytes, tuple[bool, bool, bool]] = LRUCache(maxsize=1 << 16)  # run_facts, by the blocks
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._memo.clear()
            self._facts.clear()

    def plan(
        self, units: Sequence[bytes], prefix: Prefix, outcome: Outcome, others: Others, *, form: str, first: int
    ) -> tuple[int, ...] | None:
        """An order for the run (None: as sent); feeds the blocks into ``prefix`` in the order sent."""
        if outcome.skipped == "budget" or outcome.frozen:  # texts not all read: nothing is known to be safe
            for unit in units:
                prefix.update(unit)
            return None
        outcome.check_blocks(len(units))
        ids = [block_id(unit) for unit in units]
        key = prefix.digest()
        digest = blake2b(b"".join(i.to_bytes(8, "big") for i in ids), digest_size=16, key=outcome.model[:64])
        digest.update(b"\0" + outcome.tenant)  # one key's memo hits never tell what another key sent
        memo_key = digest.digest()
        with self._lock:
            facts = self._facts.get(memo_key)
        if facts is None:
            facts = run_facts(units)
            with self._lock:
                self._facts[memo_key] = facts
        decision = decide_run(units, others, first, facts)
        if not decision.moves:
            order: tuple[int, ...] = tuple(range(len(units)))
            cached = 0  # a run that stays in place predicts nothing: the index's order is not the one sent
        else:
            with self._lock:
                memo = self._memo.get(memo_key)
            if memo is None:
                plan = outcome.choose(((key, ids),)).index.plan(key, ids, sizes=[len(unit) for unit in units])
                order, cached = plan.order, plan.cached
                with self._lock:
                    self._memo[memo_key] = order
            else:
                order = memo
                outcome.memo_hits += 1
                sent_ids = tuple(ids[i] for i in order)
                cached = outcome.choose(((key, sent_ids),)).index.held(key, sent_ids)
        ends = []
        for index in order:
            prefix.update(units[index])
            ends.append(prefix.fed)
        sent = tuple(ids[i] for i in order)
        outcome.record(key, sent, cached, ends)
        moved = list(order) != list(range(len(order)))
        outcome.choices.append(Choice(form, len(units), decision, moved, tuple(order), sent))
        outcome.reordered |= moved
        return order if moved else None
