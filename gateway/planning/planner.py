"""Online planning of proxied requests: find block groups in the prompt, order them, splice them back.

For each text in scope (system/developer/user/tool message contents and ``text`` parts, completion prompts;
never assistant messages or non-text parts; on the Messages and Responses routes, what ``gateway.wire`` walks
hand it, texts and runs of whole blocks alike) the planner finds block groups, asks the live index for an order
per group, and splices the blocks back in that order; every other byte of the body stays as it was.
``Planner.plan`` takes the decoded request (``gateway.wire.chat.RequestBody``) and returns one ``PlannedRequest``:
the body fields to change, the ``X-Prefixgate-Result`` header, and what to run as the upstream answers.

A group is planned under a *prefix key*: a digest of everything the engine sees before the group (model, tools,
earlier messages and the text before the group, as sent): blocks only share a KV prefix after identical bytes.
Multi-turn: rewrites are memoised by the original text, the options and the other texts' meaning cues, so a
resent message is rewritten byte-identically (texts left alone are remembered too). Meaning (renumber, keep
labels, leave alone) is decided from every text of the request: :mod:`gateway.planning.intercept.meaning`, and for runs
of whole blocks :mod:`gateway.planning.units`; Messages and Responses bodies are walked once to read, once to plan.

Threads: the live index and the slot table have a single writer, the event loop. A big or slow prompt is planned
in a worker thread (``in_thread=True``); its index reads and slot choice then run on the event loop
(``anyio.from_thread``), its commit there later (``PlannedRequest.accept``). The memo is guarded by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from hashlib import blake2b
from typing import Any

import anyio.from_thread
import msgspec
from cachetools import LRUCache

from engines.llamacpp.slots import SlotTable
from gateway.metrics import Metrics
from gateway.planning.citemap import CitationMap, CitationRewriter, citation_map
from gateway.planning.control import Control, parse_control
from gateway.planning.intercept import MAX_TEXT_CHARS, BlockGroup, BudgetExceeded, splice_all
from gateway.planning.intercept.boundaries import Boundaries
from gateway.planning.intercept.budget import check
from gateway.planning.intercept.meaning import NO_OTHERS, Decision, Others, RequestCues, decide
from gateway.planning.outcome import (
    DISCARD,
    Choice,
    OnLoop,
    Outcome,
    Prefix,
    Rewrite,
    block_ends,
    call_here,
    pin_slot,
)
from gateway.planning.plan import PlannedRequest, Prediction
from gateway.planning.residency import IndexView, Residency
from gateway.planning.texts import TextScan, TextScans, chat_texts
from gateway.planning.units import UnitOrders
from gateway.settings import Settings
from gateway.wire import SHAPES, AnswerRewriter, ScopedWalker, Shape
from gateway.wire.chat import ChatMessage, RequestBody
from gateway.wire.walk import Reader
from scheduler.blocks import block_id
from scheduler.prefixes import CHUNK_BYTES, Chain, Hashes, common

__all__ = ["PlannedRequest", "Planner"]  # PlannedRequest lives in gateway.planning.plan

_ROLES = {"system": "system", "developer": "system", "user": "user", "tool": "tool", "toolresult": "tool"}
_encoder = msgspec.json.Encoder()


class Planner:
    """Plans every proxied completion request (see ``plan``); owns the rewrite memo and the llama.cpp slots."""

    def __init__(
        self,
        settings: Settings,
        residency: Residency,
        metrics: Metrics,
        *,
        scan_units: int = 1 << 16,
        scans: TextScans | None = None,
        boundaries: Boundaries | None = None,
    ) -> None:
        self.settings = settings
        self.residency = residency
        self.metrics = metrics
        self._memo: LRUCache[bytes, Rewrite] = LRUCache(maxsize=settings.memo_mib << 20, getsizeof=Rewrite.size)
        self._units = UnitOrders()  # whole-block runs (documents, search results)
        residency.on_reset(self._units.clear)
        self._memo_lock = threading.Lock()
        self._scans = scans if scans is not None else TextScans(scan_units)  # replicas share one
        residency.on_reset(self._clear_memo)
        self.boundaries = boundaries if boundaries is not None else Boundaries()  # replicas share one
        residency.on_reset(self.boundaries.clear)
        self._slots: SlotTable | None = None

    def use_slots(self, count: int) -> None:
        """llama.cpp: from now on choose, for every request, one of the server's ``count`` slots (``id_slot``)."""
        self._slots = self.residency.slots = SlotTable.of(count)

    def sharing(self, residency: Any) -> Planner:
        """A planner with its own memo that shares this one's text scans and learned boundaries, whose memo
        ``residency`` clears (``gateway.upstream.router``: one planner for every replica, each request planned
        against a ``ReplicaChoice``)."""
        return Planner(self.settings, residency, self.metrics, scans=self._scans, boundaries=self.boundaries)

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
        tenant: str | None = None,
        handoff: bool = False,
        sent: Hashes | None = None,
        view: IndexView | None = None,
    ) -> PlannedRequest:
        """Plan one request; 413 when it carries more than ``max_blocks_per_request`` blocks.

        ``in_thread``: called from a worker thread; every index read and the slot choice run on the event loop.
        ``tenant``: the client key's namespace when planning state is per key (None: shared).
        ``handoff``: on the event loop, reading the texts that long raises ``PlanInThread`` (``Outcome.start``).
        ``sent``: the chunk names of the prompt as sent, when the caller has them (``sent_chain``).
        ``view``: what the request is planned against (default: this planner's residency); its ``choose`` names
        the replica at the plan's first index lookup (``IndexView``), and the plan is that replica's.
        """
        control = parse_control(headers, self.settings)
        on_loop: OnLoop = anyio.from_thread.run_sync if in_thread else call_here
        outcome = Outcome(control, bytes(body.top.get("model", b"")), on_loop, self.settings.max_blocks_per_request)
        outcome.tenant, outcome.view = (tenant or "").encode(), view if view is not None else self.residency
        outcome.start(self.settings.intercept_budget_ms / 1000, handoff)  # in the thread that plans
        fields: dict[str, Any] = {}
        answer: AnswerRewriter | None = None
        notes: list[str] = []
        chain: Hashes
        if control.enabled:
            prefix = self._walk(body, fields, outcome, Chain())
            notes = outcome.notes
            assert prefix.chain is not None
            chain = forwarded = prefix.chain.freeze()  # as sent too, unless a field changed
            if fields:
                chain = sent if sent is not None else self.sent_chain(body, headers, tenant, control)
                as_sent, held = on_loop(_held_both, outcome.choose(), chain, forwarded)
                # left as sent when the engine holds the prompt as sent past the first rewritten byte (its own
                # order matches the cache) and at least as far as the rewrite's
                predicted = outcome.predicted_chars // CHUNK_BYTES * CHUNK_BYTES  # in whole chunks, as ``held``
                if as_sent > common(chain, forwarded) * CHUNK_BYTES and as_sent >= max(held, predicted):
                    fields.clear()  # the prompt as sent hits at least as much of the cache as the rewrite
                    outcome.leave_as_sent(as_sent)
                else:
                    chain = forwarded
            result = outcome.header(shared=self.settings.shared_cache and bool(self.settings.api_key))
            for note in notes:  # a part of the request the walk left alone, and why (with the groups' reasons)
                left = result.setdefault("left_alone", {})
                left[note] = left.get(note, 0) + 1
            answer = outcome.answer
        else:
            chain = sent if sent is not None else self.sent_chain(body, headers, tenant, control)
            result = {"groups": 0, "reordered": False, "enabled": False}
        residency = outcome.choose()  # a request without block groups: chosen now (a router ranks on load alone)
        planned = PlannedRequest(
            request_id,
            residency,
            self.metrics,
            result,
            commits=tuple(outcome.commits),
            predictions=outcome.predictions,
            predicted_chars=outcome.predicted_chars,
            chain=chain,
        )
        planned.fields.update(fields)
        planned.choices = tuple(outcome.choices)
        if outcome.maps:
            answer = CitationRewriter(outcome.maps)
        planned.answer = answer
        if control.enabled:
            outcome.count(self.metrics, notes)
        if result.get("reordered"):
            self.metrics.blocks_reordered.inc()
        self.metrics.predicted_cached_blocks.inc(result.get("predicted_cached_blocks", 0))
        if residency.slots is not None:  # llama.cpp: the chosen server's slots (``use_slots``)
            on_loop(pin_slot, residency.slots, planned, body)
        return planned

    def sent_chain(
        self, body: RequestBody, headers: Mapping[str, str], tenant: str | None, control: Control | None = None
    ) -> Hashes:
        """The chunk names of the prompt as sent (``scheduler.prefixes``): the bytes the planner's walk feeds when
        nothing is rewritten, read without looking for groups (one hashing pass over the prompt)."""
        control = control if control is not None else parse_control(headers, self.settings)
        outcome = Outcome(control, bytes(body.top.get("model", b"")), call_here, self.settings.max_blocks_per_request)
        outcome.tenant, outcome.frozen = (tenant or "").encode(), True
        chain = self._walk(body, {}, outcome, Chain(), hashed=False).chain
        assert chain is not None
        return chain.freeze()

    def _walk(
        self, body: RequestBody, fields: dict[str, Any], outcome: Outcome, chain: Chain | None, hashed: bool = True
    ) -> Prefix:
        """Plan (or, ``outcome.frozen``, only read) every text of the request in prompt order; the prefix fed
        (``hashed=False``: only its chain, no prefix key digest)."""
        prefix = Prefix(None if hashed else DISCARD, chain=chain)
        prefix.update(outcome.tenant + b"\0")
        prefix.update(body.route.encode())
        prefix.update(outcome.model)
        prefix.update(body.top.get("tools", b""))
        if body.messages is not None:
            self._chat(body, body.messages, fields, prefix, outcome)
        elif body.prompt is not None:
            self._completions(body.prompt, fields, prefix, outcome)
        elif (shape := SHAPES.get(body.route)) is not None:
            outcome.answer, outcome.notes = self._shaped(shape, body, fields, prefix, outcome)
        return prefix

    def _clear_memo(self) -> None:
        with self._memo_lock:
            self._memo.clear()

    def _read(
        self, texts: Iterable[tuple[Hashable, str, bool]], outcome: Outcome
    ) -> tuple[dict[Hashable, TextScan], RequestCues]:
        """Scan every text of a request (key, text, whether its groups are looked for) and gather their cues."""
        try:
            scans = {key: self._scans.get(text, outcome.control, in_scope and len(text) <= MAX_TEXT_CHARS,
                                          outcome.scan_deadline) for key, text, in_scope in texts}  # fmt: skip
        except BudgetExceeded:
            outcome.scan_passed()
            scans = {}  # every text goes out as it came (see ``_text``)
        return scans, RequestCues((key, found.cues) for key, found in scans.items())

    def _shaped(
        self, shape: Shape, body: RequestBody, fields: dict[str, Any], prefix: Prefix, outcome: Outcome
    ) -> tuple[AnswerRewriter | None, list[str]]:
        """Messages and Responses: read every text first (a ``Reader`` walk), then plan each text and run of whole
        blocks with the cues of the others (see ``gateway.wire.walk``)."""
        reader = Reader(outcome.control.scope)
        if not outcome.frozen:  # a frozen walk only feeds the texts as sent
            shape.plan(body.top, body.raw, reader)
        scans, cues = self._read(((i, text, in_scope) for i, (text, in_scope) in enumerate(reader.texts)), outcome)

        def text(value: str, key: int) -> str | None:
            found = scans.get(key)
            if found is not None and reader.texts[key][0] != value:  # never splice another text's groups
                found = None
            return self._text(value, prefix, outcome, found, cues.others(key))

        def units(values: Sequence[bytes], form: str, first: int) -> tuple[int, ...] | None:
            return self._units.plan(values, prefix, outcome, cues.others(None), form=form, first=first)

        walked = shape.plan(body.top, body.raw, ScopedWalker(prefix.update, text, units, outcome.control.scope))
        fields.update(walked.fields)
        return walked.answer, walked.notes

    def _chat(
        self, body: RequestBody, messages: list[ChatMessage], fields: dict[str, Any], prefix: Prefix, outcome: Outcome
    ) -> None:
        sent: list[msgspec.Raw] | None = None  # the messages as sent, once one of them changes
        scope = outcome.control.scope
        scans, cues = self._read(
            ((k, t, _ROLES.get(role.lower()) in scope) for k, role, t in chat_texts(messages) if not outcome.frozen),
            outcome,
        )
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
                new = self._text(content, prefix, outcome, scans.get((i, -1)), cues.others((i, -1)))
            else:
                contexts = [(scans.get((i, j)), cues.others((i, j))) for j in range(len(content))]
                new = self._parts(content, prefix, outcome, contexts)
            if new is not None:
                sent = sent if sent is not None else body.raw_messages()
                sent[i] = message.with_content(new)
        if sent is not None:
            fields["messages"] = sent

    def _parts(
        self,
        parts: list[dict[str, Any]],
        prefix: Prefix,
        outcome: Outcome,
        contexts: Sequence[tuple[TextScan | None, Others]],
    ) -> list[dict[str, Any]] | None:
        """Rewrite the ``text`` parts of a content list; None when none changed. ``contexts[j]``: part ``j``'s
        scan and the cues of the request's other texts."""
        changed = False
        out = list(parts)
        for j, part in enumerate(parts):
            text = part.get("text") if part.get("type") == "text" else None
            if not isinstance(text, str):
                prefix.update(_encoder.encode(part))
                continue
            new = self._text(text, prefix, outcome, *contexts[j])
            if new is not None:
                changed = True
                out[j] = {**part, "text": new}
        return out if changed else None

    def _completions(self, prompt: str | list[Any], fields: dict[str, Any], prefix: Prefix, outcome: Outcome) -> None:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # one engine request, as a string is (LangChain sends a list of one)
            single = True
        else:
            single = False
        if "completions" not in outcome.control.scope:
            if isinstance(prompt, str):  # what the engine sees, for the whole prompt's chunk names
                prefix.update(prompt.encode("utf-8", "surrogatepass"))
            return
        if isinstance(prompt, str):
            new = self._text(prompt, prefix, outcome)
            if new is not None:
                fields["prompt"] = [new] if single else new
        elif prompt and all(isinstance(p, str) for p in prompt):
            # a batch: each prompt is its own engine request, each starts from the same prefix
            rewritten = [self._text(p, prefix.copy(), outcome) for p in prompt]
            if any(new is not None for new in rewritten):
                fields["prompt"] = [new if new is not None else old for new, old in zip(rewritten, prompt, strict=True)]

    def _text(
        self, text: str, prefix: Prefix, outcome: Outcome, found: TextScan | None = None, others: Others = NO_OTHERS
    ) -> str | None:
        """Rewrite one text; feed what the engine will see into ``prefix``. None when the text is unchanged."""
        if outcome.frozen:
            prefix.update(text.encode("utf-8", "surrogatepass"))
            return None
        if outcome.skipped == "budget" or len(text) > MAX_TEXT_CHARS:
            outcome.skipped = outcome.skipped or "too_large"
            prefix.update(text.encode("utf-8", "surrogatepass"))
            return None
        if found is None:
            try:
                found = self._scans.get(text, outcome.control, True, outcome.scan_deadline)
            except BudgetExceeded:
                outcome.scan_passed()
                prefix.update(text.encode("utf-8", "surrogatepass"))
                return None
        memo_key = blake2b(found.key, digest_size=16, key=outcome.model[:64])  # the text and the options
        memo_key.update(b"|" + others.signature)  # what the other texts refer to decides what may move
        memo_key.update(b"\0" + outcome.tenant)
        digest = memo_key.digest()
        with self._memo_lock:
            entry = self._memo.get(digest)
        fresh: list[int] | None = None
        if entry is None:
            try:
                entry, fresh = self._plan_text(text, prefix, outcome, others, found)
            except BudgetExceeded:
                # the text goes out as it came, and so does every later one (the budget is per request); the
                # memo remembers it as left alone so that a later turn sends the same bytes again
                outcome.skipped = "budget"
                entry, fresh = Rewrite(None, (), False), []
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
            fresh = outcome.on_loop(_cached_counts, outcome.choose(keys[:1]), keys)
            # a group that stays in place predicts nothing: the index's order is not the one sent
            fresh = [
                cached if choice.decision.moves else 0 for cached, choice in zip(fresh, entry.choices, strict=True)
            ]
        for (key, blocks), (_, _, ends), cached in zip(keys, entry.groups, fresh or (), strict=True):
            outcome.record(key, blocks, cached, ends, base)
        outcome.reordered |= entry.reordered
        outcome.choices.extend(entry.choices)
        outcome.maps.extend(entry.maps)
        return entry.text

    def _plan_text(
        self, text: str, prefix: Prefix, outcome: Outcome, others: Others, found: TextScan
    ) -> tuple[Rewrite, list[int]]:
        """Plan every group of a text not seen before; also return each group's predicted cached blocks."""
        control = outcome.control
        # blank-line splits of template contexts may cut one document: keep only boundaries traffic confirmed
        groups = self.boundaries.regroup(text, list(found.groups or ()), outcome.tenant)
        if not groups:
            return Rewrite(None, (), False), []
        outcome.check_blocks(sum(len(group.blocks) for group in groups))
        decisions = decide(text, groups, others, mapping=control.mapping, own=found.cues)
        edits: list[tuple[BlockGroup, tuple[int, ...], bool]] = []
        metas: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        choices: list[Choice] = []
        maps: list[CitationMap] = []
        cached: list[int] = []
        for group, decision in zip(groups, decisions, strict=True):
            check(outcome.deadline)
            # the key is what the engine sees before this group: earlier groups already in their new order
            before = splice_all(text[: group.start], edits, annotate=control.annotate) if edits else text[: group.start]
            key = prefix.copy()
            key.update(before.encode("utf-8", "surrogatepass"))
            order, blocks, hits = self._order(outcome, key.digest(), text, group, decision)
            edits.append((group, order, decision.renumbers))
            metas.append((len(before), blocks, block_ends(text, group, order, len(before))))
            moved = order != tuple(range(len(order)))
            choices.append(Choice(group.format, len(group), decision, moved, order, blocks))
            if decision.action == "map" and moved:
                maps.append(citation_map(text, group, order))
            cached.append(hits)
        if not any(choice.moved for choice in choices):
            return Rewrite(None, tuple(metas), False, tuple(choices)), cached
        rewritten = splice_all(text, edits, annotate=control.annotate)
        return Rewrite(rewritten, tuple(metas), True, tuple(choices), tuple(maps)), cached

    def _order(
        self, outcome: Outcome, key: bytes, text: str, group: BlockGroup, decision: Decision
    ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """The group's order, its block ids in that order, and the blocks predicted cached.

        Renumbered blocks are identified without their number (they render the same at any position); blocks
        that keep their labels, or stay where they are, with it: they render the same only under the same label.
        """
        if decision.renumbers:
            ids = [block_id(k) for k in group.keys(text)]
        else:
            ids = [block_id(text[block.start : block.end].strip()) for block in group.blocks]
            if not decision.moves:
                return tuple(range(len(ids))), tuple(ids), 0
        index = outcome.choose(((key, ids),)).index  # the first lookup chooses the replica (``IndexView``)
        # blocks cut at boundaries learned from traffic: a later request may not show them as blocks (and then
        # goes out in the client's order), so new blocks keep the order sent rather than converge on nothing
        learned = group.label.endswith(":learned")  # see gateway.planning.intercept.boundaries
        plan = outcome.on_loop(index.plan, key, ids, learned)
        if decision.action == "keep_labels" and plan.order != tuple(range(len(ids))):
            # each block carries its own label, so its rendering is shared with no request that numbers it
            # otherwise: moving the group gains only what the index predicts, and costs the prefix as sent
            as_sent = outcome.on_loop(index.held, key, ids)
            if plan.cached <= as_sent:
                return tuple(range(len(ids))), tuple(ids), as_sent
        return plan.order, plan.blocks, plan.cached


def _held_both(residency: Residency, sent: Hashes, forwarded: Hashes) -> tuple[int, int]:
    """Characters of the prompt as sent and as rewritten that the engine holds (on the loop)."""
    return residency.held_chars(sent), residency.held_chars(forwarded)


def _cached_counts(residency: Residency, keys: Sequence[Prediction]) -> list[int]:
    """How many leading blocks of each group, in the order the memo sends them, the index holds (on the loop)."""
    return [residency.index.held(key, blocks) for key, blocks in keys]
