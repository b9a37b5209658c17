"""Online planning of proxied requests: find block groups in the prompt, order them, splice them back.

For each text in scope (system/developer/user/tool message contents and ``text`` parts, completion prompts;
never assistant messages or non-text parts) the planner finds block groups, asks the live index for an order
per group, and splices the blocks back in that order; every other byte of the body stays as it was.

A group is planned under a *prefix key*: a digest of everything the engine sees before the group (model,
tools, earlier messages as sent, the text before the group as sent), because blocks only share a KV prefix
when all preceding bytes are identical.

Multi-turn stability: the rewrite of a text is memoised by a digest of the original text (and the options
that shape it), so when a later turn resends the same message, it is rewritten byte-identically and the
prefix that turn 1 cached still matches. The memo also remembers texts it left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import msgspec
from cachetools import LRUCache

from engines.llamacpp.slots import Path, SlotTable
from gateway.errors import InvalidRequest
from gateway.intercept import MODES, BlockGroup, find_groups, splice_all
from gateway.metrics import Metrics
from gateway.proxy import Exchange
from gateway.residency import Residency
from gateway.settings import Settings
from gateway.wire import ChatView, CompletionView
from scheduler.blocks import block_id

__all__ = ["Control", "Planner", "parse_control"]

logger = logging.getLogger("prefixgate.planner")

_ROLES = {"system": "system", "developer": "system", "user": "user", "tool": "tool", "toolresult": "tool"}
_SCOPES = {
    "all": frozenset({"system", "user", "tool", "completions"}),
    "system": frozenset({"system"}),
    "user": frozenset({"user"}),
    "tool": frozenset({"tool"}),
    "tools": frozenset({"tool"}),
    "tool_results": frozenset({"tool"}),
    "completions": frozenset({"completions"}),
}
_MIN_PREDICTED_CHARS = 400
_CHARS_PER_TOKEN = 4
_STALE_FRACTION = 0.25
_OFF = {"0", "false", "no", "off", "disabled"}
_ON = {"1", "true", "yes", "on", "enabled"}
_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Control:
    """Per-request options: headers ``X-Prefixgate-*`` (or ContextPilot's ``X-ContextPilot-*``) over defaults."""

    enabled: bool
    mode: str = "auto"
    tag: str | None = None
    separator: str | None = None
    scope: frozenset[str] = _SCOPES["all"]
    annotate: bool = False

    def signature(self) -> bytes:
        return f"{self.mode}|{self.tag}|{self.separator}|{int(self.annotate)}".encode()


def _flag(value: str, header: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _ON:
        return True
    if lowered in _OFF:
        return False
    raise InvalidRequest(f"header {header} must be on or off, got {value!r}", param=header, code="invalid_header")


def parse_control(headers: Mapping[str, str], settings: Settings) -> Control:
    """Read the control headers. Ours are validated (400 on nonsense); ContextPilot's are lenient, as there."""
    enabled = settings.reorder
    if (value := headers.get("x-contextpilot-enabled")) is not None:
        enabled = value.strip().lower() not in {"false", "0", "no"}
    if (value := headers.get("x-prefixgate-reorder")) is not None:
        enabled = _flag(value, "X-Prefixgate-Reorder")
    mode = "auto"
    if (value := headers.get("x-contextpilot-mode")) is not None and value.strip() in MODES:
        mode = value.strip()
    if (value := headers.get("x-prefixgate-format")) is not None:
        if value.strip() not in MODES:
            raise InvalidRequest(
                f"header X-Prefixgate-Format must be one of {sorted(MODES)}", param="X-Prefixgate-Format"
            )
        mode = value.strip()
    scope = _SCOPES[settings.reorder_scope]
    if (value := headers.get("x-contextpilot-scope")) is not None:
        scope = _SCOPES.get(value.strip().lower(), _SCOPES["all"])
    if (value := headers.get("x-prefixgate-scope")) is not None:
        parts = [part.strip().lower() for part in value.split(",") if part.strip()]
        if not parts or any(part not in _SCOPES for part in parts):
            raise InvalidRequest(
                f"header X-Prefixgate-Scope takes a comma list of {sorted(_SCOPES)}", param="X-Prefixgate-Scope"
            )
        scope = frozenset().union(*(_SCOPES[part] for part in parts))
    annotate = settings.relevance_annotation
    if (value := headers.get("x-prefixgate-annotate")) is not None:
        annotate = _flag(value, "X-Prefixgate-Annotate")
    tag = headers.get("x-prefixgate-tag") or headers.get("x-contextpilot-tag")
    separator = headers.get("x-prefixgate-separator") or headers.get("x-contextpilot-separator")
    return Control(enabled, mode, tag, separator, scope, annotate)


class _Prefix:
    """A digest of what the engine sees, fed in prompt order, that also counts how much it was fed."""

    __slots__ = ("fed", "hasher")

    def __init__(self, hasher: Any = None, fed: int = 0) -> None:
        self.hasher = hasher if hasher is not None else blake2b(digest_size=16)
        self.fed = fed

    def update(self, data: bytes) -> None:
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
    """One request's planning: its options and model, and what it found (for the commit and the header)."""

    control: Control
    model: bytes
    commits: list[tuple[Hashable, tuple[int, ...]]] = field(default_factory=list)  # (prefix key, sent blocks)
    groups: int = 0
    blocks: int = 0
    reordered: bool = False
    cached: int = 0
    memo_hits: int = 0
    predicted_chars: int = 0  # how far into the prompt the predicted cached prefix reaches
    predictions: list[tuple[Hashable, tuple[int, ...]]] = field(default_factory=list)  # (key, cached blocks)

    def header(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "blocks": self.blocks,
            "reordered": self.reordered,
            "predicted_cached_blocks": self.cached,
            "memo_hits": self.memo_hits,
        }


class Planner:
    """Called by the proxy for every completion request (see ``gateway.proxy.Exchange``)."""

    def __init__(self, settings: Settings, residency: Residency, metrics: Metrics, memo_chars: int = 64 << 20) -> None:
        self.settings = settings
        self.residency = residency
        self.metrics = metrics
        self._memo: LRUCache[bytes, _Rewrite] = LRUCache(
            maxsize=memo_chars, getsizeof=lambda entry: 256 + (len(entry.text) if entry.text else 0)
        )
        residency.on_reset(self._memo.clear)
        self.slots: SlotTable | None = None  # set once a llama-server's slot count is known

    def __call__(self, exchange: Exchange) -> None:
        control = parse_control(exchange.headers, self.settings)
        top = _raw_top.decode(exchange.body)
        outcome = _Outcome(control, bytes(top.get("model", b"")))
        if control.enabled:
            prefix = _Prefix()
            prefix.update(exchange.route.encode())
            prefix.update(outcome.model)
            prefix.update(bytes(top.get("tools", b"")))
            if isinstance(exchange.view, ChatView):
                self._chat(exchange.view, top, exchange, prefix, outcome)
            else:
                self._completions(exchange.view, exchange, prefix, outcome)
            exchange.result = outcome.header()
        else:
            exchange.result = {"groups": 0, "reordered": False, "enabled": False}
        if outcome.reordered:
            self.metrics.blocks_reordered.inc()
        self.metrics.predicted_cached_blocks.inc(outcome.cached)
        commits, request_id = tuple(outcome.commits), exchange.request_id
        if outcome.predictions:
            exchange.on_usage = lambda cached: self._check_prediction(cached, outcome, request_id)
        if self.slots is not None:
            self._pin_slot(exchange, top, commits)
        elif commits and not self.residency.stateless:
            exchange.on_accept = lambda: self.residency.commit(request_id, commits)

    def _check_prediction(self, cached_tokens: int | None, outcome: _Outcome, request_id: str) -> None:
        """Engine feedback: far fewer cached tokens than predicted means the index holds evicted entries.

        The prediction is in characters (~4 per token); below a quarter of it, every other request whose
        committed path runs through the predicted prefix is released, since the engine no longer holds it.
        """
        if cached_tokens is None or outcome.predicted_chars < _MIN_PREDICTED_CHARS:
            return
        if cached_tokens >= outcome.predicted_chars / _CHARS_PER_TOKEN * _STALE_FRACTION:
            return
        self.metrics.stale_predictions.inc()
        own = set(self.residency.group_ids(request_id, len(outcome.commits)))
        stale = [
            rid
            for key, blocks in outcome.predictions
            for rid in self.residency.index.requests_sharing(key, blocks)
            if rid not in own
        ]
        if stale:
            self.metrics.stale_released.inc(len(self.residency.index.evict(stale).evicted))
            logger.info("engine reported %d cached tokens, far below the prediction: released %d", cached_tokens,
                        len(stale))  # fmt: skip

    def _pin_slot(self, exchange: Exchange, top: dict[str, msgspec.Raw], commits: Path) -> None:
        """llama.cpp: send the request to the slot that holds most of its prefix; track what slots hold."""
        slots = self.slots
        assert slots is not None
        chosen = _client_slot(top, len(slots.slots))
        if chosen is None:
            chosen = slots.choose(commits)
            exchange.fields["id_slot"] = chosen
        else:
            slots.reserve(chosen)
        request_id = exchange.request_id
        if exchange.result is not None:
            exchange.result["slot"] = chosen

        def accepted() -> None:
            previous = slots.occupy(chosen, request_id, commits)
            if previous is not None:
                self.residency.evict([previous])
            self.residency.commit(request_id, commits)

        exchange.on_accept = accepted
        exchange.on_finish = lambda: slots.finish(chosen)

    def _chat(
        self, view: ChatView, top: dict[str, msgspec.Raw], exchange: Exchange, prefix: _Prefix, outcome: _Outcome
    ) -> None:
        raw_messages = _raw_list.decode(top["messages"])
        changed = False
        for i, message in enumerate(view.messages):
            kind = _ROLES.get(message.role.lower())
            content = message.content
            if kind not in outcome.control.scope or content is None:
                prefix.update(bytes(raw_messages[i]))
                continue
            for name, value in sorted(_raw_top.decode(raw_messages[i]).items()):
                if name != "content":
                    prefix.update(name.encode() + b"=" + bytes(value))
            if isinstance(content, str):
                new = self._text(content, prefix, outcome)
                if new is not None:
                    raw_messages[i] = _replace(raw_messages[i], {"content": new})
                    changed = True
                continue
            parts = list(content)
            parts_changed = False
            for j, part in enumerate(parts):
                text = part.get("text") if part.get("type") == "text" else None
                if not isinstance(text, str):
                    prefix.update(_encoder.encode(part))
                    continue
                new = self._text(text, prefix, outcome)
                if new is not None:
                    parts_changed = True
                    parts[j] = {**part, "text": new}
            if parts_changed:
                raw_messages[i] = _replace(raw_messages[i], {"content": parts})
                changed = True
        if changed:
            exchange.fields["messages"] = raw_messages

    def _completions(self, view: CompletionView, exchange: Exchange, prefix: Any, outcome: _Outcome) -> None:
        if "completions" not in outcome.control.scope:
            return
        prompt = view.prompt
        if isinstance(prompt, str):
            new = self._text(prompt, prefix, outcome)
            if new is not None:
                exchange.fields["prompt"] = new
        elif prompt and all(isinstance(p, str) for p in prompt):
            # a batch: each prompt is its own engine request, each starts from the same prefix
            rewritten = [self._text(p, prefix.copy(), outcome) for p in prompt]
            if any(new is not None for new in rewritten):
                exchange.fields["prompt"] = [
                    new if new is not None else old for new, old in zip(rewritten, prompt, strict=True)
                ]

    def _text(self, text: str, prefix: Any, outcome: _Outcome) -> str | None:
        """Rewrite one text; feed what the engine will see into ``prefix``. None when the text is unchanged."""
        control = outcome.control
        memo_key = blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, key=outcome.model[:64])
        memo_key.update(control.signature())
        digest = memo_key.digest()
        entry = self._memo.get(digest)
        fresh: list[int] | None = None
        if entry is None:
            entry, fresh = self._plan_text(text, prefix, control)
            self._memo[digest] = entry
        else:
            outcome.memo_hits += 1
        out = entry.text if entry.text is not None else text
        position = 0
        base = prefix.fed
        for index, (start, blocks, ends) in enumerate(entry.groups):
            prefix.update(out[position:start].encode("utf-8", "surrogatepass"))
            position = start
            key = prefix.digest()
            outcome.commits.append((key, blocks))
            outcome.groups += 1
            outcome.blocks += len(blocks)
            cached = fresh[index] if fresh is not None else self.residency.index.plan(key, blocks).cached
            outcome.cached += cached
            if cached:
                outcome.predictions.append((key, blocks[:cached]))
                outcome.predicted_chars = max(outcome.predicted_chars, base + ends[cached - 1])
        prefix.update(out[position:].encode("utf-8", "surrogatepass"))
        outcome.reordered |= entry.reordered
        return entry.text

    def _plan_text(self, text: str, prefix: Any, control: Control) -> tuple[_Rewrite, list[int]]:
        """Plan every group of a text not seen before; also return each group's predicted cached blocks."""
        try:
            groups = find_groups(text, control.mode, tag=control.tag, separator=control.separator)
        except ValueError as exc:
            raise InvalidRequest(f"invalid control header: {exc}", code="invalid_header") from None
        if control.mode == "auto":
            # blank-line splits of template contexts may cut one document into paragraphs: only on request
            groups = [group for group in groups if not group.label.endswith(":paragraphs")]
        if not groups:
            return _Rewrite(None, (), False), []
        edits: list[tuple[BlockGroup, tuple[int, ...]]] = []
        metas: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        cached: list[int] = []
        for group in groups:
            # the key is what the engine sees before this group: earlier groups already in their new order
            before = splice_all(text[: group.start], edits, annotate=control.annotate) if edits else text[: group.start]
            key = prefix.copy()
            key.update(before.encode("utf-8", "surrogatepass"))
            plan = self.residency.index.plan(key.digest(), [block_id(k) for k in group.keys(text)])
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


def _replace(raw_message: msgspec.Raw, fields: dict[str, Any]) -> msgspec.Raw:
    """The message with ``fields`` replaced; its other keys keep their exact bytes."""
    decoded = _raw_top.decode(raw_message)
    for key, value in fields.items():
        decoded[key] = msgspec.Raw(_encoder.encode(value))
    return msgspec.Raw(_encoder.encode(decoded))
