"""What planning one request produces, piece by piece (``gateway.planning.planner`` drives it).

``Prefix`` is the digest of what the engine sees before a point of the prompt; ``Rewrite`` one memoised text
rewrite; ``Choice`` what meaning allowed for one group; ``Outcome`` everything found while planning one request,
and the ``X-Prefixgate-Result`` header made from it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import msgspec

from engines.llamacpp.slots import SlotTable
from gateway.errors import PayloadTooLarge
from gateway.metrics import Metrics
from gateway.planning.citemap import CitationMap
from gateway.planning.control import Control
from gateway.planning.intercept import BlockGroup
from gateway.planning.intercept.meaning import Decision
from gateway.planning.plan import PlannedRequest, Prediction, estimate_tokens
from gateway.planning.residency import IndexView, Residency
from gateway.wire import AnswerRewriter
from scheduler.prefixes import Chain

if TYPE_CHECKING:
    from gateway.planning.texts import Reading
    from gateway.wire.chat import RequestBody

__all__ = ["DISCARD", "Choice", "Outcome", "Prefix", "Rewrite", "block_ends", "client_slot", "pin_slot"]


class _Discard:
    """A hasher that keeps nothing: a prefix fed only for its chain (``Planner.sent_chain``)."""

    @staticmethod
    def update(data: Any) -> None:
        return None

    def copy(self) -> _Discard:
        return self


DISCARD = _Discard()


class Prefix:
    """A digest of what the engine sees, fed in prompt order, that also counts how much it was fed. The request's
    own prefix (not its copies, the keys of groups) also names the whole prompt's chunks (``chain``)."""

    __slots__ = ("chain", "fed", "hasher")

    def __init__(self, hasher: Any = None, fed: int = 0, chain: Chain | None = None) -> None:
        self.hasher = hasher if hasher is not None else blake2b(digest_size=16)
        self.fed = fed
        self.chain = chain

    def update(self, data: bytes | msgspec.Raw) -> None:
        self.hasher.update(data)
        self.fed += len(data)
        if self.chain is not None:
            self.chain.update(data)

    def copy(self) -> Prefix:
        return Prefix(self.hasher.copy(), self.fed)

    def digest(self) -> bytes:
        digest: bytes = self.hasher.digest()
        return digest


@dataclass(frozen=True, slots=True)
class Rewrite:
    """A memoised text rewrite: the new text (None: unchanged) and, per group, where it starts in the output,
    its blocks in sent order, and where each block's rendering ends in the output."""

    text: str | None
    groups: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]
    reordered: bool
    choices: tuple[Choice, ...] = ()  # per group, what meaning allowed and what was done
    maps: tuple[CitationMap, ...] = ()  # citation mapping: the answer's numbers back to the client's
    counted: tuple[tuple[int, int, int], ...] = ()  # with --tokenizer: the output's (end, chars, exact tokens) pieces
    follows: tuple[tuple[int, ...], ...] = ()  # per group, per slot: the template bytes a cache matches past it

    def size(self) -> int:
        """Bytes held, as the memo counts them: the new text's own size, plus the UTF-8 copy Python keeps with a
        non-ASCII text once it has been encoded into a request; the rest of the entry counted as 256."""
        text = self.text
        if text is None:
            return 256
        return 256 + sys.getsizeof(text) + (0 if text.isascii() else len(text.encode(errors="surrogatepass")))


@dataclass(frozen=True, slots=True)
class Choice:
    """One group's format, size, decision and whether its blocks actually moved (for the header and /metrics); for
    the decision log (``gateway.proxy.decisions``), its ``order`` (the sent index of each forwarded block) and
    ``ids`` (its block ids, in forwarded order)."""

    format: str
    blocks: int
    decision: Decision
    moved: bool
    order: tuple[int, ...] = ()
    ids: tuple[int, ...] = ()


@dataclass(slots=True)
class Outcome:
    """One request's planning, on the event loop (``Planner.plan``): its options, model and block limit, what its
    first phase read (``reading``; None for a walk that only reads the prompt as sent), and what it found."""

    control: Control
    model: bytes
    max_blocks: int
    reading: Reading | None = None
    tenant: bytes = b""
    deadline: float | None = None
    skipped: str | None = None  # why some text was forwarded without (complete) interception
    commits: list[tuple[Hashable, tuple[int, ...]]] = field(default_factory=list)  # (prefix key, sent blocks)
    extents: list[tuple[int, ...]] = field(default_factory=list)  # per commit, where each block ends in the prompt
    groups: int = 0
    blocks: int = 0
    reordered: bool = False
    cached: int = 0
    memo_hits: int = 0
    predicted_chars: int = 0
    predictions: list[Prediction] = field(default_factory=list)
    counted: list[tuple[int, int, int]] = field(default_factory=list)  # with --tokenizer: (end, chars, tokens)
    choices: list[Choice] = field(default_factory=list)
    maps: list[CitationMap] = field(default_factory=list)
    frozen: bool = False  # only read the texts in prompt order, as sent (``Planner.sent_chain``)
    as_sent: str | None = None  # why the rewrite was dropped (``leave_as_sent``)
    notes: list[str] = field(default_factory=list)  # Messages and Responses: parts their walk left alone
    answer: AnswerRewriter | None = None  # Messages and Responses: what puts the answer back in the client's terms
    view: IndexView | None = None  # what the request is planned against (None: only read, ``frozen``)
    chosen: Residency | None = None  # the replica's residency, once ``choose`` chose it

    def choose(self, groups: Sequence[tuple[Hashable, Sequence[int]]] = ()) -> Residency:
        """The residency of the replica the request goes to: chosen once, at its first index lookup, by the
        view's explicit ``choose`` with that lookup's groups (``IndexView``)."""
        chosen = self.chosen
        if chosen is None:
            assert self.view is not None, "a frozen walk reads no index"
            chosen = self.chosen = self.view.choose(groups)
        return chosen

    def check_blocks(self, more: int) -> None:
        """413 before planning ``more`` blocks would take the request past ``max_blocks_per_request``."""
        if self.blocks + more > self.max_blocks:
            raise PayloadTooLarge(
                f"the request carries at least {self.blocks + more} retrieved blocks; at most {self.max_blocks} "
                "are accepted",
                code="too_many_blocks",
            )

    def record(
        self,
        key: Hashable,
        blocks: tuple[int, ...],
        cached: int,
        ends: Sequence[int],
        base: int = 0,
        *,
        follow: Sequence[int] = (),
    ) -> None:
        """One planned group: its blocks in sent order, how many are predicted cached, where each ends (+ base), and
        the template bytes after each slot that an engine matches past a cached block (``follows``)."""
        self.commits.append((key, blocks))
        self.extents.append(tuple(base + end for end in ends))
        self.groups += 1
        self.blocks += len(blocks)
        self.cached += cached
        if cached:
            self.predictions.append((key, blocks[:cached]))
            reach = ends[cached - 1] + (follow[cached - 1] if follow else 0)
            self.predicted_chars = max(self.predicted_chars, base + reach)

    def leave_as_sent(self, chars: int, reason: str = "cached_as_sent") -> None:
        """Drop the rewrite: the prompt goes out as sent, which the engine holds ``chars`` of (every group that
        would have moved is left alone, for ``reason``; the block index learns nothing of it). Reasons:
        ``cached_as_sent`` (the engine holds the prompt as sent at least as far as the rewrite) and
        ``would_overwrite_cached`` (``Residency.overwrites``)."""
        self.as_sent, self.reordered, self.answer = reason, False, None
        self.choices = [
            Choice(c.format, c.blocks, Decision("leave_alone", reason), False) if c.moved else c for c in self.choices
        ]
        self.maps.clear()
        self.commits.clear()
        self.extents.clear()
        self.predictions.clear()
        self.counted.clear()
        self.cached, self.predicted_chars = 0, chars

    def count(self, metrics: Metrics, notes: Sequence[str]) -> None:
        """Groups found, reordered and decided, and blocks found, by format; parts left alone (``/metrics``)."""
        for note in notes:
            metrics.left_alone.labels(note).inc()
        if self.as_sent is not None:
            metrics.left_alone.labels(self.as_sent).inc()
        for choice in self.choices:
            metrics.groups_found.labels(choice.format).inc()
            metrics.blocks_found.labels(choice.format).inc(choice.blocks)
            if choice.moved:
                metrics.groups_reordered.labels(choice.format).inc()
            if choice.decision.action != "renumber" or choice.decision.reason:  # order_sent_before
                metrics.groups_decided.labels(choice.format, choice.decision.action, choice.decision.reason).inc()
        if self.skipped is not None:
            metrics.intercept_skipped.labels(self.skipped).inc()

    def header(self, shared: bool) -> dict[str, Any]:
        """The ``X-Prefixgate-Result`` fields; with a cache shared across keys, nothing another key can move."""
        result: dict[str, Any] = {"groups": self.groups, "blocks": self.blocks, "reordered": self.reordered}
        if not shared:
            result["predicted_cached_blocks"] = self.cached
            result["predicted_cached_tokens"] = estimate_tokens(self.predicted_chars)
            result["memo_hits"] = self.memo_hits
        if self.skipped is not None:
            result["skipped"] = self.skipped
        for action, name in (("keep_labels", "kept_labels"), ("leave_alone", "left_alone"), ("map", "mapped")):
            reasons = Counter(c.decision.reason for c in self.choices if c.decision.action == action)
            if reasons:
                result[name] = dict(sorted(reasons.items()))
        # groups a later turn refers to by position, sent again in an earlier turn's order that keeps them in place
        kept = sum(1 for c in self.choices if c.decision.reason == "order_sent_before")
        if kept:
            result["order_sent_before"] = kept
        return result


_LEAD_CHARS = 64  # at most this much of the blocks' common start counts as template (``follows``)


def follows(text: str, group: BlockGroup) -> tuple[int, ...]:
    """Per slot, the template bytes an engine's cache matches past a cached block there: when the cached prompt went
    on with another block, its next bytes were the gap after this slot and the start every block of the group shares
    (``<document id="``), whichever block came next. The last slot ends the group: nothing is assumed past it."""
    blocks = group.blocks
    if len(blocks) < 2:
        return (0,) * len(blocks)
    starts = [text[b.start : min(b.end, b.start + _LEAD_CHARS)] for b in blocks]
    same = (len(set(chars)) == 1 for chars in zip(*starts, strict=False))  # up to the shortest start
    lead = next((i for i, alike in enumerate(same) if not alike), min(map(len, starts)))
    return (*(len(gap) + lead for gap in group.gaps(text)), 0)


def block_ends(text: str, group: BlockGroup, order: Sequence[int], start: int) -> tuple[int, ...]:
    """Where each block's rendering ends in the output, for blocks in ``order`` from ``start`` (gaps stay put)."""
    gaps = [len(gap) for gap in group.gaps(text)]
    ends: list[int] = []
    position = start
    for slot, index in enumerate(order):
        block = group.blocks[index]
        position += block.end - block.start
        ends.append(position)
        if slot < len(gaps):
            position += gaps[slot]
    return tuple(ends)


def client_slot(top: dict[str, msgspec.Raw], count: int) -> int | None:
    """A valid ``id_slot`` the client chose itself (kept as is), else None."""
    raw = top.get("id_slot")
    if raw is None:
        return None
    value = msgspec.json.decode(raw)
    return value if type(value) is int and 0 <= value < count else None


def pin_slot(slots: SlotTable, planned: PlannedRequest, body: RequestBody) -> None:
    """llama.cpp: pin the request to the slot holding the longest prefix of its whole forwarded prompt, when the
    gateway knows better than llama.cpp's own choice (``SlotTable.choose``; a client's own ``id_slot`` is kept);
    else leave ``id_slot`` out and record where llama.cpp will put it (``SlotTable.guess``)."""
    known = True
    pinnable = body.route != "/v1/messages"  # llama-server's Messages route drops id_slot: llama.cpp chooses
    chosen = client_slot(body.top, len(slots.slots)) if pinnable else None
    if chosen is None:
        chosen = slots.choose(planned.chain) if pinnable else None
        if chosen is None:
            chosen, known = slots.guess(planned.chain), False
        else:
            planned.fields["id_slot"] = chosen
    slots.reserve(chosen)
    planned.result["slot"] = chosen
    if not known:
        planned.result["slot_guessed"] = True
    planned.slots, planned.slot, planned.slot_known = slots, chosen, known
