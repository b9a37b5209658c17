"""Online planning of proxied requests: find block groups in the prompt, order them, splice them back.

For each text in scope (system/developer/user/tool message contents and ``text`` parts, completion prompts;
never assistant messages or non-text parts) the planner finds block groups, asks the live index for an order
per group, and splices the blocks back in that order; every other byte of the body stays as it was.
``Planner.plan`` takes the decoded request (``gateway.wire.RequestBody``) and returns one ``PlannedRequest``:
the body fields to change, the ``X-Prefixgate-Result`` header, and what to run as the upstream answers.

A group is planned under a *prefix key*: a digest of everything the engine sees before the group (model,
tools, earlier messages as sent, the text before the group as sent), because blocks only share a KV prefix
when all preceding bytes are identical.

Multi-turn stability: the rewrite of a text is memoised by a digest of the original text (and the options
that shape it), so when a later turn resends the same message, it is rewritten byte-identically and the
prefix that turn 1 cached still matches. The memo also remembers texts it left alone.

Threads: the live index and the slot table have a single writer, the event loop. A big prompt is planned in a
worker thread (``plan(..., in_thread=True)``); its index reads and its slot choice then run on the event loop
(``anyio.from_thread``), and its commit runs there later, in ``PlannedRequest.accept``. The memo is guarded
by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, TypeVar

import anyio.from_thread
import msgspec
from cachetools import LRUCache

from engines.llamacpp.slots import SlotTable
from gateway.control import Control, parse_control
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.intercept import BlockGroup, find_groups, splice_all
from gateway.metrics import Metrics
from gateway.planned import PlannedRequest, Prediction
from gateway.residency import Residency
from gateway.settings import Settings
from gateway.wire import ChatMessage, RequestBody
from scheduler.blocks import block_id

__all__ = ["Detections", "PlannedRequest", "Planner"]  # PlannedRequest lives in gateway.planned

T = TypeVar("T")
OnLoop = Callable[..., Any]
"""Runs ``fn(*args)`` on the event loop: a plain call there, ``anyio.from_thread.run_sync`` from a worker."""

_ROLES = {"system": "system", "developer": "system", "user": "user", "tool": "tool", "toolresult": "tool"}
_encoder = msgspec.json.Encoder()


def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class _Prefix:
    """A digest of what the engine sees, fed in prompt order, that also counts how much it was fed."""

    __slots__ = ("fed", "hasher")

    def __init__(self, hasher: Any = None, fed: int = 0) -> None:
        self.hasher = hasher if hasher is not None else blake2b(digest_size=16)
        self.fed = fed

    def update(self, data: bytes | msgspec.Raw) -> None:
        self.hasher.update(data)
        self.fed += len(data)

    def copy(self) -> _Prefix:
        return _Prefix(self.hasher.copy(), self.fed)

    def digest(self) -> bytes:
        digest: bytes = self.hasher.digest()
        return digest


@dataclass(frozen=True, slots=True)
class _Rewrite:
    """A memoised text rewrite: the new text (None: unchanged) and, per group, where it starts in the output,
    its blocks in sent order, and where each block's rendering ends in the output."""

    text: str | None
    groups: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]
    reordered: bool


@dataclass(slots=True)
class _Outcome:
    """One request's planning: its options, model and block limit, and what it found."""

    control: Control
    model: bytes
    on_loop: OnLoop
    max_blocks: int
    commits: list[tuple[Hashable, tuple[int, ...]]] = field(default_factory=list)  # (prefix key, sent blocks)
    groups: int = 0
    blocks: int = 0
    reordered: bool = False
    cached: int = 0
    memo_hits: int = 0
    predicted_chars: int = 0
    predictions: list[Prediction] = field(default_factory=list)

    def check_blocks(self, more: int) -> None:
        """413 before planning ``more`` blocks would take the request past ``max_blocks_per_request``."""
        if self.blocks + more > self.max_blocks:
            raise PayloadTooLarge(
                f"the request carries at least {self.blocks + more} retrieved blocks; at most {self.max_blocks} "
                "are accepted",
                code="too_many_blocks",
            )

    def header(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "blocks": self.blocks,
            "reordered": self.reordered,
            "predicted_cached_blocks": self.cached,
            "memo_hits": self.memo_hits,
        }


class Detections:
    """Where the block groups of each text are: independent of any index, so the planners of several replicas
    share one (a request planned for two replicas is searched for blocks once). Thread-safe."""

    def __init__(self, size: int = 4096) -> None:
        self._cache: LRUCache[bytes, list[BlockGroup]] = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> list[BlockGroup] | None:
        with self._lock:
            return self._cache.get(digest)

    def put(self, digest: bytes, groups: list[BlockGroup]) -> None:
        with self._lock:
            self._cache[digest] = groups


class Planner:
    """Plans every proxied completion request (see ``plan``); owns the rewrite memo and the llama.cpp slots."""

    def __init__(
        self,
        settings: Settings,
        residency: Residency,
        metrics: Metrics,
        memo_chars: int = 64 << 20,
        detections: Detections | None = None,
    ) -> None:
        self.settings = settings
        self._detections = detections
        self.residency = residency
        self.metrics = metrics
        self._memo: LRUCache[bytes, _Rewrite] = LRUCache(
            maxsize=memo_chars, getsizeof=lambda entry: 256 + (len(entry.text) if entry.text else 0)
        )
        self._memo_lock = threading.Lock()
        residency.on_reset(self._clear_memo)
        self._slots: SlotTable | None = None

    def use_slots(self, count: int) -> None:
        """llama.cpp: from now on pin every request to one of the server's ``count`` slots (``id_slot``)."""
        self._slots = SlotTable.of(count)

    @property
    def slot_count(self) -> int | None:
        """The llama-server's slot count once known (None: requests are not pinned)."""
        return len(self._slots.slots) if self._slots is not None else None

    def plan(
        self,
        body: RequestBody,
        request_id: str,
        headers: Mapping[str, str],
        *,
        in_thread: bool = False,
        record: bool = True,
    ) -> PlannedRequest:
        """Plan one request; 413 when it carries more than ``max_blocks_per_request`` blocks.

        ``in_thread``: called from a worker thread; every index read and the slot choice run on the event loop.
        ``record=False`` (a routing probe, see ``gateway.router``) counts nothing in the metrics.
        """
        control = parse_control(headers, self.settings)
        on_loop: OnLoop = anyio.from_thread.run_sync if in_thread else _call
        outcome = _Outcome(control, bytes(body.top.get("model", b"")), on_loop, self.settings.max_blocks_per_request)
        fields: dict[str, Any] = {}
        if control.enabled:
            prefix = _Prefix()
            prefix.update(body.route.encode())
            prefix.update(outcome.model)
            prefix.update(body.top.get("tools", b""))
            if body.messages is not None:
                self._chat(body, body.messages, fields, prefix, outcome)
            elif body.prompt is not None:
                self._completions(body.prompt, fields, prefix, outcome)
            result = outcome.header()
        else:
            result = {"groups": 0, "reordered": False, "enabled": False}
        planned = PlannedRequest(
            request_id,
            self.residency,
            self.metrics,
            result,
            commits=tuple(outcome.commits),
            predictions=outcome.predictions,
            predicted_chars=outcome.predicted_chars,
        )
        planned.fields.update(fields)
        if record:
            self.record(planned)
        if self._slots is not None:
            on_loop(self._pin_slot, planned, body)
        return planned

    def record(self, planned: PlannedRequest) -> None:
        """Count a planned request in the metrics (once, for the replica it is sent to)."""
        if planned.result.get("reordered"):
            self.metrics.blocks_reordered.inc()
        self.metrics.predicted_cached_blocks.inc(planned.result.get("predicted_cached_blocks", 0))

    def _pin_slot(self, planned: PlannedRequest, body: RequestBody) -> None:
        """llama.cpp: send the request to the slot that holds most of its prefix (unless the client chose one)."""
        slots = self._slots
        assert slots is not None
        chosen = _client_slot(body.top, len(slots.slots))
        if chosen is None:
            chosen = slots.choose(planned.commits)
            planned.fields["id_slot"] = chosen
        else:
            slots.reserve(chosen)
        planned.result["slot"] = chosen
        planned.slots, planned.slot = slots, chosen

    def _clear_memo(self) -> None:
        with self._memo_lock:
            self._memo.clear()

    def _chat(
        self, body: RequestBody, messages: list[ChatMessage], fields: dict[str, Any], prefix: _Prefix, outcome: _Outcome
    ) -> None:
        sent: list[msgspec.Raw] | None = None  # the messages as sent, once one of them changes
        for i, message in enumerate(messages):
            kind = _ROLES.get(message.role.lower())
            content = message.content
            planned = kind in outcome.control.scope and content is not None
            for name, value in sorted(message.fields.items()):
                if name != "content" or not planned:  # a planned content is fed as sent, group by group
                    prefix.update(name.encode() + b"=")
                    prefix.update(value)
            if content is None or not planned:
                continue
            new: str | list[dict[str, Any]] | None
            if isinstance(content, str):
                new = self._text(content, prefix, outcome)
            else:
                new = self._parts(content, prefix, outcome)
            if new is not None:
                sent = sent if sent is not None else body.raw_messages()
                sent[i] = message.with_content(new)
        if sent is not None:
            fields["messages"] = sent

    def _parts(self, parts: list[dict[str, Any]], prefix: _Prefix, outcome: _Outcome) -> list[dict[str, Any]] | None:
        """Rewrite the ``text`` parts of a content list; None when none changed."""
        changed = False
        out = list(parts)
        for j, part in enumerate(parts):
            text = part.get("text") if part.get("type") == "text" else None
            if not isinstance(text, str):
                prefix.update(_encoder.encode(part))
                continue
            new = self._text(text, prefix, outcome)
            if new is not None:
                changed = True
                out[j] = {**part, "text": new}
        return out if changed else None

    def _completions(self, prompt: str | list[Any], fields: dict[str, Any], prefix: _Prefix, outcome: _Outcome) -> None:
        if "completions" not in outcome.control.scope:
            return
        if isinstance(prompt, str):
            new = self._text(prompt, prefix, outcome)
            if new is not None:
                fields["prompt"] = new
        elif prompt and all(isinstance(p, str) for p in prompt):
            # a batch: each prompt is its own engine request, each starts from the same prefix
            rewritten = [self._text(p, prefix.copy(), outcome) for p in prompt]
            if any(new is not None for new in rewritten):
                fields["prompt"] = [new if new is not None else old for new, old in zip(rewritten, prompt, strict=True)]

    def _text(self, text: str, prefix: _Prefix, outcome: _Outcome) -> str | None:
        """Rewrite one text; feed what the engine will see into ``prefix``. None when the text is unchanged."""
        control = outcome.control
        memo_key = blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, key=outcome.model[:64])
        memo_key.update(control.signature())
        digest = memo_key.digest()
        with self._memo_lock:
            entry = self._memo.get(digest)
        fresh: list[int] | None = None
        if entry is None:
            entry, fresh = self._plan_text(text, prefix, outcome, digest)
            with self._memo_lock:
                self._memo[digest] = entry
        else:
            outcome.memo_hits += 1
            outcome.check_blocks(sum(len(blocks) for _, blocks, _ in entry.groups))
        out = entry.text if entry.text is not None else text
        position = 0
        base = prefix.fed
        keys: list[Prediction] = []
        for start, blocks, _ in entry.groups:
            prefix.update(out[position:start].encode("utf-8", "surrogatepass"))
            position = start
            keys.append((prefix.digest(), blocks))
        prefix.update(out[position:].encode("utf-8", "surrogatepass"))
        if fresh is None and keys:
            fresh = outcome.on_loop(self._cached_counts, keys)
        for (key, blocks), (_, _, ends), cached in zip(keys, entry.groups, fresh or (), strict=True):
            outcome.commits.append((key, blocks))
            outcome.groups += 1
            outcome.blocks += len(blocks)
            outcome.cached += cached
            if cached:
                outcome.predictions.append((key, blocks[:cached]))
                outcome.predicted_chars = max(outcome.predicted_chars, base + ends[cached - 1])
        outcome.reordered |= entry.reordered
        return entry.text

    def _cached_counts(self, keys: Sequence[Prediction]) -> list[int]:
        """How many leading blocks of each group the index predicts cached (on the event loop)."""
        return [self.residency.index.plan(key, blocks).cached for key, blocks in keys]

    def _plan_text(
        self, text: str, prefix: _Prefix, outcome: _Outcome, digest: bytes = b""
    ) -> tuple[_Rewrite, list[int]]:
        """Plan every group of a text not seen before; also return each group's predicted cached blocks."""
        control = outcome.control
        groups = self._detections.get(digest) if self._detections is not None and digest else None
        if groups is None:
            try:
                groups = find_groups(text, control.mode, tag=control.tag, separator=control.separator)
            except ValueError as exc:
                raise InvalidRequest(f"invalid control header: {exc}", code="invalid_header") from None
            if control.mode == "auto":
                # blank-line splits of template contexts may cut one document into paragraphs: only on request
                groups = [group for group in groups if not group.label.endswith(":paragraphs")]
            if self._detections is not None and digest:
                self._detections.put(digest, groups)
        if not groups:
            return _Rewrite(None, (), False), []
        outcome.check_blocks(sum(len(group.blocks) for group in groups))
        edits: list[tuple[BlockGroup, tuple[int, ...]]] = []
        metas: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        cached: list[int] = []
        for group in groups:
            # the key is what the engine sees before this group: earlier groups already in their new order
            before = splice_all(text[: group.start], edits, annotate=control.annotate) if edits else text[: group.start]
            key = prefix.copy()
            key.update(before.encode("utf-8", "surrogatepass"))
            plan = outcome.on_loop(self.residency.index.plan, key.digest(), [block_id(k) for k in group.keys(text)])
            edits.append((group, plan.order))
            metas.append((len(before), plan.blocks, _block_ends(text, group, plan.order, len(before))))
            cached.append(plan.cached)
        if not any(list(order) != list(range(len(order))) for _, order in edits):
            return _Rewrite(None, tuple(metas), False), cached
        return _Rewrite(splice_all(text, edits, annotate=control.annotate), tuple(metas), True), cached


def _block_ends(text: str, group: BlockGroup, order: Sequence[int], start: int) -> tuple[int, ...]:
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


def _client_slot(top: dict[str, msgspec.Raw], count: int) -> int | None:
    """A valid ``id_slot`` the client chose itself (kept as is), else None."""
    raw = top.get("id_slot")
    if raw is None:
        return None
    value = msgspec.json.decode(raw)
    return value if type(value) is int and 0 <= value < count else None
