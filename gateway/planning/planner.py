"""Online planning of proxied requests: find block groups in the prompt, order them, splice them back.

For each text in scope (system/developer/user/tool message contents and ``text`` parts, completion prompts;
never assistant messages or non-text parts; on the Messages and Responses routes, what ``gateway.wire`` walks
hand it, texts and runs of whole blocks alike) the planner finds block groups, asks the live index for an order
per group, and splices the blocks back in that order; every other byte of the body stays as it was.
Planning runs in two phases. ``Planner.read`` takes the decoded request (``gateway.wire.chat.RequestBody``) and
reads it without the live index: every text's block groups and meaning cues (``TextScans``), and for each text
whose rewrite is not remembered the groups after learned boundaries and what meaning allows for each (a
``Reading``). It touches nothing the event loop owns, so it may run in a worker thread. ``Planner.plan`` takes the
``Reading`` on the event loop: it asks the live index for an order per group, splices the blocks, and returns one
``PlannedRequest``: the body fields to change, the ``X-Prefixgate-Result`` header, and what to run as the upstream
answers.

A group is planned under a *prefix key*: a digest of everything the engine sees before the group (model, tools,
earlier messages and the text before the group, as sent): blocks only share a KV prefix after identical bytes.
Multi-turn: rewrites are memoised by the original text, the options and the other texts' meaning cues, so a
resent message is rewritten byte-identically (texts left alone are remembered too). A later turn that refers to
the blocks by position ("the first document") would have the text left in the client's order, and the cached
conversation lost from there: when every position it names holds the same block in the order the text was sent
in before, that order means the same, and the text is sent in it again (reason ``order_sent_before``).
Meaning (renumber, keep labels, leave alone) is decided from every text of the request:
:mod:`gateway.planning.intercept.meaning`, and for runs of whole blocks :mod:`gateway.planning.units`; Messages
and Responses bodies are walked once to read, once to plan.

Threads: the live index and the slot table have a single writer, the event loop, and only ``plan`` reads them.
``read`` may run in a worker thread (a big body; one whose texts took the loop's inline slice): the text scans, the
learned boundaries and the memo it consults are guarded by locks, and the boundaries learn what a request shows
only in ``plan``, once, as the text is planned.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from hashlib import blake2b
from typing import Any

import msgspec
from cachetools import LRUCache

from engines.llamacpp.slots import SlotTable
from gateway.metrics import Metrics
from gateway.planning.citemap import CitationMap, CitationRewriter, citation_map
from gateway.planning.control import Control, parse_control
from gateway.planning.intercept import MAX_TEXT_CHARS, BlockGroup, BudgetExceeded, splice_all
from gateway.planning.intercept.boundaries import Boundaries
from gateway.planning.intercept.budget import check, deadline_in
from gateway.planning.intercept.meaning import NO_OTHERS, Decision, Others, RequestCues, decide
from gateway.planning.outcome import DISCARD, Choice, Outcome, Prefix, Rewrite, block_ends, follows, pin_slot
from gateway.planning.plan import PlannedRequest, Prediction
from gateway.planning.residency import BlockTokens, IndexView, Residency
from gateway.planning.texts import Meaning, Reading, TextScan, TextScans, chat_texts
from gateway.planning.units import UnitOrders
from gateway.settings import TOKENIZER_AUTO, Settings
from gateway.wire import SHAPES, AnswerRewriter, ScopedWalker, Shape
from gateway.wire.chat import ChatMessage, RequestBody
from gateway.wire.walk import Reader
from scheduler.blocks import block_id
from scheduler.prefixes import CHUNK_BYTES, Chain, Hashes, common

__all__ = ["INLINE_SCAN_SECONDS", "PlannedRequest", "Planner", "Reading"]  # they live in plan and texts

# CPU for reading a request on the event loop: a RAG body under 64 KB takes ~1 ms to plan in all (module doc of
# gateway.proxy.pipeline), a crafted one up to the whole budget; past this slice the rest is read in a worker thread
INLINE_SCAN_SECONDS = 0.005

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
        tokens: BlockTokens | None = None,
    ) -> None:
        self.settings = settings
        self.residency = residency
        self.metrics = metrics
        self._memo: LRUCache[bytes, Rewrite] = LRUCache(maxsize=settings.memo_mib << 20, getsizeof=Rewrite.size)
        # each text's last reordered rewrite, whatever the other texts said (shares its texts with the memo)
        self._sent: LRUCache[bytes, Sent] = LRUCache(maxsize=settings.memo_mib << 18, getsizeof=Sent.size)
        self._units = UnitOrders()  # whole-block runs (documents, search results)
        residency.on_reset(self._units.clear)
        self._memo_lock = threading.Lock()
        self._scans = scans if scans is not None else TextScans(scan_units)  # replicas share one
        residency.on_reset(self._clear_memo)
        self.boundaries = boundaries if boundaries is not None else Boundaries()  # replicas share one
        # --tokenizer: exact token counts of blocks, for predictions (replicas share one)
        if tokens is None and settings.tokenizer:  # with 'auto', loaded once the engine names its model
            tokens = BlockTokens(None if settings.tokenizer == TOKENIZER_AUTO else settings.tokenizer)
        self._tokens = tokens
        residency.on_reset(self.boundaries.clear)
        self._slots: SlotTable | None = None
        self._slot_total: int | None = None

    def use_slots(self, count: int, *, pin: bool = True) -> None:
        """llama.cpp: the server has ``count`` slots; with ``pin``, from now on choose one of them for every request
        (``id_slot``). Without, requests are left to llama-server's own choice, and its prompt cache."""
        self._slot_total = count
        if not pin and self.residency.reuse_overwrites:
            self.residency.in_slots = deque(maxlen=count)
        if pin:
            self._slots = self.residency.slots = SlotTable.of(count)

    def sharing(self, residency: Any) -> Planner:
        """A planner with its own memo that shares this one's text scans and learned boundaries, whose memo
        ``residency`` clears (``gateway.upstream.router``: one planner for every replica, each request planned
        against a ``ReplicaChoice``)."""
        return Planner(
            self.settings, residency, self.metrics, scans=self._scans, boundaries=self.boundaries, tokens=self._tokens
        )

    @property
    def slot_count(self) -> int | None:
        """The llama-server's slot count once known (None: not a llama-server, or not known yet)."""
        return self._slot_total

    def read(
        self,
        body: RequestBody,
        headers: Mapping[str, str],
        *,
        tenant: str | None = None,
        client: str | None = None,
        inline: bool = False,
        resume: Reading | None = None,
    ) -> Reading:
        """The first phase, without the live index (any thread): read every text of the request, its groups and
        meaning cues, and decide the meaning of each text whose rewrite is not remembered (``Reading``).

        ``tenant``: the client key's namespace when planning state is per key (None: shared).
        ``client``: the key's namespace when keys share the planning state (``--shared-cache``): learned boundaries
        then count distinct clients, so that no one key confirms a boundary alone.
        ``inline`` (on the event loop): reading may take ``INLINE_SCAN_SECONDS`` of CPU; past it the reading comes
        back with ``complete`` False, and ``read(..., resume=it)`` in a worker thread goes on from where it stopped,
        with the whole budget. Past the budget the reading is ``skipped`` (every text goes out as it came).
        """
        reading = resume or Reading(body, headers, tenant, parse_control(headers, self.settings), client)
        reading.complete = True
        control = reading.control
        if not control.enabled:
            return reading
        budget = self.settings.intercept_budget_ms / 1000
        sliced = inline and budget > INLINE_SCAN_SECONDS
        deadline = deadline_in(INLINE_SCAN_SECONDS if sliced else budget)
        texts = _texts(body, control.scope, reading)
        model, owner = bytes(body.top.get("model", b"")), (tenant or "").encode()
        try:
            for key, text, in_scope in texts:
                if key not in reading.scans:
                    looked_for = in_scope and len(text) <= MAX_TEXT_CHARS
                    reading.scans[key] = self._scans.get(text, control, looked_for, deadline)
            if body.prompt is None and reading.cues is None:  # completion prompts are read each alone
                reading.cues = RequestCues((key, found.cues) for key, found in reading.scans.items())
            for key, text, _ in texts:
                found = reading.scans[key]
                if not found.groups or key in reading.meanings:
                    continue
                others = reading.others(key)
                with self._memo_lock:
                    remembered = _memo_digest(found, others, model, owner) in self._memo
                if not remembered:  # a remembered rewrite is sent again as it was: nothing to decide
                    check(deadline)
                    reading.meanings[key] = self._mean(text, found, others, reading, owner)
        except BudgetExceeded:
            if sliced:
                reading.complete = False
            else:
                reading.skipped = "budget"
        return reading

    def plan(
        self, reading: Reading, request_id: str, *, sent: Hashes | None = None, view: IndexView | None = None
    ) -> PlannedRequest:
        """The second phase, on the event loop: plan what ``read`` found against the live index, splice it, and
        choose the llama.cpp slot; 413 when the request carries more than ``max_blocks_per_request`` blocks.

        ``sent``: the chunk names of the prompt as sent, when the caller has them (``sent_chain``).
        ``view``: what the request is planned against (default: this planner's residency); its ``choose`` names
        the replica at the plan's first index lookup (``IndexView``), and the plan is that replica's.
        """
        body, control, tenant = reading.body, reading.control, reading.tenant
        outcome = Outcome(control, bytes(body.top.get("model", b"")), self.settings.max_blocks_per_request, reading)
        outcome.tenant, outcome.view = (tenant or "").encode(), view if view is not None else self.residency
        outcome.skipped, outcome.deadline = reading.skipped, deadline_in(self.settings.intercept_budget_ms / 1000)
        fields: dict[str, Any] = {}
        answer: AnswerRewriter | None = None
        notes: list[str] = []
        chain: Hashes
        marks: Hashes = ()
        prompt_chars = 0
        if control.enabled:
            prefix = self._walk(body, fields, outcome, Chain(marked=True))
            prompt_chars = prefix.fed
            notes = outcome.notes
            assert prefix.chain is not None
            chain = forwarded = prefix.chain.freeze()  # as sent too, unless a field changed
            marks = tuple(prefix.chain.marks)
            if fields:
                chain = sent if sent is not None else self.sent_chain(body, reading.headers, tenant, control)
                chosen = outcome.choose()
                as_sent, held = _held_both(chosen, chain, forwarded)
                # left as sent when the engine holds the prompt as sent past the first rewritten byte (its own
                # order matches the cache) and at least as far as the rewrite's; or, on llama.cpp, when the rewrite
                # would cost a prompt it keeps for a part of it (``Residency.overwrites``)
                predicted = outcome.predicted_chars // CHUNK_BYTES * CHUNK_BYTES  # in whole chunks, as ``held``
                reason = (
                    "would_overwrite_cached"
                    if chosen.overwrites(forwarded, held, as_sent)
                    else "cached_as_sent"
                    if as_sent > common(chain, forwarded) * CHUNK_BYTES and as_sent >= max(held, predicted)
                    else None
                )
                if reason is not None:
                    fields.clear()
                    outcome.leave_as_sent(as_sent, reason)
                    marks = ()  # the walk's are the rewrite's
                else:
                    chain = forwarded
            result = outcome.header(shared=self.settings.shared_cache and bool(self.settings.api_key))
            for note in notes:  # a part of the request the walk left alone, and why (with the groups' reasons)
                left = result.setdefault("left_alone", {})
                left[note] = left.get(note, 0) + 1
            answer = outcome.answer
        else:
            chain = sent if sent is not None else self.sent_chain(body, reading.headers, tenant, control)
            result = {"groups": 0, "reordered": False, "enabled": False}
        residency = outcome.choose()  # a request without block groups: chosen now (a router ranks on load alone)
        planned = PlannedRequest(
            request_id,
            residency,
            self.metrics,
            result,
            commits=tuple(outcome.commits),
            extents=tuple(outcome.extents),
            predictions=outcome.predictions,
            predicted_chars=outcome.predicted_chars,
            prompt_chars=prompt_chars,
            chain=chain,
            marks=marks,
            counted=tuple(outcome.counted),
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
            pin_slot(residency.slots, planned, body)
        return planned

    def sent_chain(
        self, body: RequestBody, headers: Mapping[str, str], tenant: str | None, control: Control | None = None
    ) -> Hashes:
        """The chunk names of the prompt as sent (``scheduler.prefixes``): the bytes the planner's walk feeds when
        nothing is rewritten, read without looking for groups (one hashing pass over the prompt)."""
        control = control if control is not None else parse_control(headers, self.settings)
        outcome = Outcome(control, bytes(body.top.get("model", b"")), self.settings.max_blocks_per_request)
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

    @property
    def tokens(self) -> BlockTokens | None:
        """What ``--tokenizer`` counts with (shared by the replicas' planners; None without it)."""
        return self._tokens

    def _clear_memo(self) -> None:
        with self._memo_lock:
            self._memo.clear()
            self._sent.clear()

    def _shaped(
        self, shape: Shape, body: RequestBody, fields: dict[str, Any], prefix: Prefix, outcome: Outcome
    ) -> tuple[AnswerRewriter | None, list[str]]:
        """Messages and Responses: plan each text and run of whole blocks with the cues of the others, the texts
        numbered as ``read``'s ``Reader`` walk numbered them (see ``gateway.wire.walk``)."""
        reading = outcome.reading
        others = reading.others(None) if reading is not None else NO_OTHERS

        def text(value: str, key: int) -> str | None:
            return self._text(value, prefix, outcome, key)

        def units(values: Sequence[bytes], form: str, first: int) -> tuple[int, ...] | None:
            return self._units.plan(values, prefix, outcome, others, form=form, first=first)

        walked = shape.plan(body.top, body.raw, ScopedWalker(prefix.update, text, units, outcome.control.scope))
        fields.update(walked.fields)
        return walked.answer, walked.notes

    def _chat(
        self, body: RequestBody, messages: list[ChatMessage], fields: dict[str, Any], prefix: Prefix, outcome: Outcome
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
                new = self._text(content, prefix, outcome, (i, -1))
            else:
                new = self._parts(content, prefix, outcome, i)
            if new is not None:
                sent = sent if sent is not None else body.raw_messages()
                sent[i] = message.with_content(new)
        if sent is not None:
            fields["messages"] = sent

    def _parts(
        self, parts: list[dict[str, Any]], prefix: Prefix, outcome: Outcome, message: int
    ) -> list[dict[str, Any]] | None:
        """Rewrite the ``text`` parts of message ``message``'s content list; None when none changed."""
        changed = False
        out = list(parts)
        for j, part in enumerate(parts):
            text = part.get("text") if part.get("type") == "text" else None
            if not isinstance(text, str):
                prefix.update(_encoder.encode(part))
                continue
            new = self._text(text, prefix, outcome, (message, j))
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
            new = self._text(prompt, prefix, outcome, _PROMPT)
            if new is not None:
                fields["prompt"] = [new] if single else new
        elif prompt and all(isinstance(p, str) for p in prompt):
            # a batch: each prompt is its own engine request, each starts from the same prefix
            rewritten = [self._text(p, prefix.copy(), outcome, (_PROMPT, k)) for k, p in enumerate(prompt)]
            if any(new is not None for new in rewritten):
                fields["prompt"] = [new if new is not None else old for new, old in zip(rewritten, prompt, strict=True)]

    def _text(self, text: str, prefix: Prefix, outcome: Outcome, key: Hashable) -> str | None:
        """Rewrite one text, the one ``read`` read under ``key``; feed what the engine will see into ``prefix``.
        None when the text is unchanged."""
        reading = outcome.reading
        found = reading.scans.get(key) if reading is not None and not outcome.frozen else None
        if found is None or outcome.skipped == "budget" or len(text) > MAX_TEXT_CHARS:
            if found is not None and outcome.skipped != "budget":
                outcome.skipped = outcome.skipped or "too_large"
            self._as_is(text, prefix, outcome)
            return None
        assert reading is not None
        if reading.texts.get(key) != text:  # never splice another text's groups (the walks number texts alike)
            self._as_is(text, prefix, outcome)
            return None
        others = reading.others(key)
        digest = _memo_digest(found, others, outcome.model, outcome.tenant)
        with self._memo_lock:
            entry = self._memo.get(digest)
        fresh: list[int] | None = None
        if entry is None:
            try:
                # decided while reading; else its rewrite was remembered then and has been forgotten since, or the
                # text has no groups: decided now
                meaning = reading.meanings.get(key) or self._mean(text, found, others, reading, outcome.tenant)
                sent = _sent_digest(found, outcome.model, outcome.tenant)
                with self._memo_lock:
                    before = self._sent.get(sent)
                kept = before.kept(meaning) if before is not None else None
                if kept is not None:
                    self.boundaries.record(meaning.shown)
                    entry, fresh = kept, None
                else:
                    entry, fresh = self._plan_text(text, prefix, outcome, meaning)
                if entry.reordered:
                    with self._memo_lock:
                        self._sent[sent] = Sent(entry, tuple((g.start, g.end, len(g)) for g in meaning.groups))
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
            fresh = _cached_counts(outcome.choose(keys[:1]), keys)
            # a group that stays in place predicts nothing: the index's order is not the one sent
            fresh = [
                cached if choice.decision.moves else 0 for cached, choice in zip(fresh, entry.choices, strict=True)
            ]
        follow = entry.follows or ((),) * len(keys)
        for (group_key, blocks), (_, _, ends), cached, after in zip(
            keys, entry.groups, fresh or (), follow, strict=True
        ):
            outcome.record(group_key, blocks, cached, ends, base, follow=after)
        outcome.counted.extend((base + end, chars, tokens) for end, chars, tokens in entry.counted)
        outcome.reordered |= entry.reordered
        outcome.choices.extend(entry.choices)
        outcome.maps.extend(entry.maps)
        return entry.text

    def _as_is(self, text: str, prefix: Prefix, outcome: Outcome) -> None:
        """Feed a text that goes out as sent (with ``--tokenizer``, its exact tokens too)."""
        if not outcome.frozen:
            outcome.counted.extend((prefix.fed + end, c, t) for end, c, t in self._count(text, (), (), ()))
        prefix.update(text.encode("utf-8", "surrogatepass"))

    def _mean(self, text: str, found: TextScan, others: Others, reading: Reading, tenant: bytes) -> Meaning:
        """A text's groups and what meaning allows for each, without the index (``Reading.meanings``). Blank-line
        splits of template contexts may cut one document: only boundaries traffic confirmed are kept."""
        client = reading.client.encode() if reading.client is not None else None
        groups, shown = self.boundaries.read(text, found.groups or (), tenant, client)
        decisions = decide(text, groups, others, mapping=reading.control.mapping, own=found.cues) if groups else []
        return Meaning(tuple(groups), tuple(decisions), shown)

    def _plan_text(self, text: str, prefix: Prefix, outcome: Outcome, meaning: Meaning) -> tuple[Rewrite, list[int]]:
        """Plan every group of a text not seen before; also return each group's predicted cached blocks."""
        control = outcome.control
        self.boundaries.record(meaning.shown)  # what the text shows, learned once, as it is planned
        groups, decisions = meaning.groups, meaning.decisions
        if not groups:
            return Rewrite(None, (), False, counted=self._count(text, (), (), ())), []
        outcome.check_blocks(sum(len(group.blocks) for group in groups))
        edits: list[tuple[BlockGroup, tuple[int, ...], bool]] = []
        metas: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        sizes: list[tuple[int, ...]] = []  # each group's block sizes in forwarded order
        choices: list[Choice] = []
        maps: list[CitationMap] = []
        cached: list[int] = []
        for group, decision in zip(groups, decisions, strict=True):
            check(outcome.deadline)
            # the key is what the engine sees before this group: earlier groups already in their new order
            before = splice_all(text[: group.start], edits, annotate=control.annotate) if edits else text[: group.start]
            head = before.encode("utf-8", "surrogatepass")
            key = prefix.copy()
            key.update(head)
            start = None  # the prompt's chunk names up to the group (a learned group may be ordered by them)
            if prefix.chain is not None and group.label.endswith(_LEARNED):
                start = prefix.chain.copy()
                start.update(head)
            order, blocks, hits = self._order(outcome, key.digest(), text, group, decision, start=start)
            edits.append((group, order, decision.renumbers))
            metas.append((len(before), blocks, block_ends(text, group, order, len(before))))
            sizes.append(tuple(group.blocks[i].end - group.blocks[i].start for i in order))
            moved = order != tuple(range(len(order)))
            choices.append(Choice(group.format, len(group), decision, moved, order, blocks))
            if decision.action == "map" and moved:
                maps.append(citation_map(text, group, order))
            cached.append(hits)
        after = tuple(follows(text, group) for group in groups)
        if not any(choice.moved for choice in choices):
            counted = self._count(text, metas, sizes, after)
            return Rewrite(None, tuple(metas), False, tuple(choices), counted=counted, follows=after), cached
        rewritten = splice_all(text, edits, annotate=control.annotate)
        counted = self._count(rewritten, metas, sizes, after)
        return Rewrite(rewritten, tuple(metas), True, tuple(choices), tuple(maps), counted, after), cached

    def _count(
        self,
        out: str,
        metas: Sequence[tuple[int, tuple[int, ...], tuple[int, ...]]],
        sizes: Sequence[tuple[int, ...]],
        after: Sequence[tuple[int, ...]],
    ) -> tuple[tuple[int, int, int], ...]:
        """With ``--tokenizer``: the output text cut where a prediction can end (each block's end, and past the template
        bytes after it, ``follows``), each piece's characters and exact tokens, from the text's start to its end.
        Template bytes and documents are counted apart (each text once, ``BlockTokens``), so a piece that recurs in
        other combinations is counted once. A text over ``_COUNTED_CHARS`` is left to the estimate (bounded work)."""
        if self._tokens is None or not self._tokens.ready or len(out) > _COUNTED_CHARS:
            return ()
        count = self._tokens.count
        pieces: list[tuple[int, int, int]] = []
        position = 0
        for (_, _, ends), lengths, follow in zip(metas, sizes, after, strict=True):
            for end, length, extra in zip(ends, lengths, follow, strict=True):
                start = max(position, end - length)
                tokens = (count(out[position:start]) if start > position else 0) + count(out[start:end])
                pieces.append((end, end - position, tokens))
                position = end
                if extra:
                    pieces.append((end + extra, extra, count(out[end : end + extra])))
                    position = end + extra
        if position < len(out):
            pieces.append((len(out), len(out) - position, count(out[position:])))
        return tuple(pieces)

    def _order(
        self,
        outcome: Outcome,
        key: bytes,
        text: str,
        group: BlockGroup,
        decision: Decision,
        *,
        start: Chain | None = None,
    ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """The group's order, its block ids in that order, and the blocks predicted cached.

        Renumbered blocks are identified without their number (they render the same at any position); blocks
        that keep their labels, or stay where they are, with it: they render the same only under the same label.
        ``start``: for a group cut at learned boundaries, the prompt's chunk names up to it: the prompts sent
        whole may hold more of the group than the block index knows (``_held_order``). Blocks nothing else orders
        go longest first (``LiveIndex.plan``, ``sizes``), but for such a group the engine holds none of on an
        engine whose reuse overwrites a prompt (``Residency.reuse_overwrites``: llama.cpp) with slots the gateway
        pins, which goes as sent.
        """
        if decision.renumbers:
            ids = [block_id(k) for k in group.keys(text)]
        else:
            ids = [block_id(text[block.start : block.end].strip()) for block in group.blocks]
            if not decision.moves:
                return tuple(range(len(ids))), tuple(ids), 0
        residency = outcome.choose(((key, ids),))  # the first lookup chooses the replica (``IndexView``)
        index = residency.index
        # blocks cut at boundaries learned from traffic: a later request may not show them as blocks (and then
        # goes out in the client's order), so new blocks of one length keep the order sent, not the block ids
        learned = group.label.endswith(_LEARNED)  # see gateway.planning.intercept.boundaries
        plan = index.plan(key, ids, learned, [block.end - block.start for block in group.blocks])
        # a group the block index already predicts whole cannot be held further: no search
        held = (
            _held_order(residency, start, text, group)
            if learned and start is not None and plan.cached < len(ids)
            else None
        )
        if held is not None:
            order, cached = held
            if cached > plan.cached:  # the whole prompts sent hold more of it than the block index knows
                return order, tuple(ids[i] for i in order), cached
        if learned and plan.cached == 0 and residency.reuse_overwrites and residency.in_slots is None:
            # llama.cpp with pinned slots, nothing of it held: a move gains nothing predicted and can cost a prompt:
            # one kept in its host-RAM cache goes back to a slot, and no longer to the cache, for a request that
            # keeps a quarter of it, which overwrites the rest (``bench apps --sets repeat``, seed 1: a group moved
            # longest first opened like a prompt held there, and that prompt's repeat found 301 of its 958 tokens,
            # not 957). Left to its own slot choice, the gateway knows which prompts its slots hold, and the whole
            # rewrite goes as sent where it would take one out of the host-RAM cache (``Residency.overwrites``).
            # Elsewhere a prefix stays held for every prompt that shares it, and longest first pays off
            return tuple(range(len(ids))), tuple(ids), 0
        if decision.action == "keep_labels" and plan.order != tuple(range(len(ids))):
            # each block carries its own label, so its rendering is shared with no request that numbers it
            # otherwise: moving the group gains only what the index predicts, and costs the prefix as sent
            as_sent = index.held(key, ids)
            if plan.cached <= as_sent:
                return tuple(range(len(ids))), tuple(ids), as_sent
        return plan.order, plan.blocks, plan.cached


_LEARNED = ":learned"  # the label suffix of a group cut at boundaries learned from traffic
_HELD_ORDER_BLOCKS = 16  # a bigger learned group is not ordered by the prompt index
_HELD_ORDER_STEPS = 256  # candidate blocks tried per group (each a hash of the block and a prefix index lookup)
_HELD_ORDER_NAMES = 1 << 16  # chunk names copied per group at most (each try copies the prompt's chain so far)
_COUNTED_CHARS = 1 << 18  # with --tokenizer, longer texts are estimated, not counted (tokenizing is on the event loop)
_Order = tuple[int, ...]


def _held_order(residency: Residency, start: Chain, text: str, group: BlockGroup) -> tuple[tuple[int, ...], int] | None:
    """An order for a learned group (whose blocks the block index may know only in part), from what the engine holds
    of whole prompts (``Residency.held_chars``: the prefix index, or llama.cpp's slots): the leading blocks that keep
    the prompt held furthest (a search over the blocks each held prefix can continue with, ``_HELD_ORDER_STEPS``
    tries at most, fewer behind a long prompt: ``_HELD_ORDER_NAMES``), then the others as sent; and how many
    blocks it predicts held. None when no block continues what is held, or when the prompt left what is held
    before the group.

    Another request of the same template cut its documents apart (``intercept.boundaries``) but sent them before
    the block index could name them: its prompt, whole, is in the prefix index, so the blocks that continue it are
    found by their bytes. What is held counts in whole chunks (``CHUNK_BYTES``), every one held, or to the byte
    where a prompt sent went on with the block and the blank line after it (a paragraph mark): a block too short to
    end a chunk is told apart by its mark, or else by the blocks after it.
    """
    count = len(group.blocks)
    if not 2 <= count <= _HELD_ORDER_BLOCKS:
        return None
    base = start.freeze()
    if residency.held_chars(base) < len(base) * CHUNK_BYTES:
        return None
    pieces = [text[block.start : block.end].encode("utf-8", "surrogatepass") for block in group.blocks]
    gaps = [gap.encode("utf-8", "surrogatepass") for gap in group.gaps(text)] + [b""]
    steps = min(_HELD_ORDER_STEPS, _HELD_ORDER_NAMES // len(base)) if base else _HELD_ORDER_STEPS

    def longest(chain: Chain, taken: tuple[int, ...], reach: int, ended: tuple[int, ...]) -> tuple[int, _Order]:
        """The best held continuation of ``taken`` (whose prompt is held for ``reach`` bytes, the last of them
        reached by the blocks ``ended``): the bytes held, and its blocks up to the last one that reached further."""
        nonlocal steps
        best = (reach, ended)
        for index in range(count):
            if index in taken or steps <= 0:
                continue
            steps -= 1
            candidate = chain.copy()
            candidate.update(pieces[index] + gaps[len(taken)])
            names = candidate.freeze()
            if residency.held_chars(names) < len(names) * CHUNK_BYTES:
                continue  # a chunk it ends is not held
            # held to the byte where a prompt sent went on with this block and the blank line after it (a mark)
            held = candidate.position if residency.holds(candidate.mark()) else len(names) * CHUNK_BYTES
            path = (*taken, index)
            found = longest(candidate, path, max(held, reach), path if held > reach else ended)
            if found[0] > best[0]:
                best = found
        return best

    _, order = longest(start, (), len(base) * CHUNK_BYTES, ())
    if not order:
        return None
    return (*order, *(index for index in range(count) if index not in order)), len(order)


def _held_both(residency: Residency, sent: Hashes, forwarded: Hashes) -> tuple[int, int]:
    """Characters of the prompt as sent and as rewritten that the engine holds."""
    return residency.held_chars(sent), residency.held_chars(forwarded)


def _cached_counts(residency: Residency, keys: Sequence[Prediction]) -> list[int]:
    """How many leading blocks of each group, in the order the memo sends them, the index holds."""
    return [residency.index.held(key, blocks) for key, blocks in keys]


@dataclass(frozen=True, slots=True)
class Sent:
    """A text's last reordered rewrite and the spans of the groups it was planned on."""

    rewrite: Rewrite
    spans: tuple[tuple[int, int, int], ...]

    def size(self) -> int:
        return 64 + self.rewrite.size()

    def kept(self, meaning: Meaning) -> Rewrite | None:
        """This rewrite, when it means what the text means under ``meaning`` (the same groups; each moved group
        either allowed to move as it was, or left alone only for positions that hold the same block in it); its
        choices then say ``order_sent_before``. None otherwise."""
        groups = meaning.groups
        if self.spans != tuple((g.start, g.end, len(g)) for g in groups):
            return None
        choices = list(self.rewrite.choices)
        for i, (group, decision) in enumerate(zip(groups, meaning.decisions, strict=True)):
            choice = choices[i]
            if not choice.moved or decision.action == choice.decision.action:
                continue
            positions = decision.positions
            if decision.reason != "referenced" or positions is None or group.number_base is not None:
                return None
            size = len(choice.order)
            at = [p - 1 if p > 0 else size + p for p in positions]  # 1-based from the start, -1 the last
            if not at or any(not 0 <= k < size or choice.order[k] != k for k in at):
                return None
            kept = Decision(choice.decision.action, "order_sent_before")
            choices[i] = Choice(choice.format, choice.blocks, kept, True, choice.order, choice.ids)
        return replace(self.rewrite, choices=tuple(choices))


def _sent_digest(found: TextScan, model: bytes, tenant: bytes) -> bytes:
    """The key of a text's last reordered rewrite: the text and its options, the model and the key's namespace."""
    digest = blake2b(found.key, digest_size=16, key=model[:64], person=b"pg-sent")
    digest.update(b"\0" + tenant)
    return digest.digest()


def _memo_digest(found: TextScan, others: Others, model: bytes, tenant: bytes) -> bytes:
    """The rewrite memo's key: the text and its options, what the other texts refer to (it decides what may move),
    the model and the client key's namespace."""
    digest = blake2b(found.key, digest_size=16, key=model[:64])
    digest.update(b"|" + others.signature)
    digest.update(b"\0" + tenant)
    return digest.digest()


_PROMPT = "prompt"  # the key of a completion prompt (a batch's: with its position)


def _texts(body: RequestBody, scope: Collection[str], reading: Reading) -> list[tuple[Hashable, str, bool]]:
    """Every text of the request, whatever its role, by the key ``plan``'s walk asks for it (message and part; a
    ``Reader`` walk's ordinal; a completion prompt's position), and whether its groups are looked for; recorded in
    ``reading.texts``."""
    texts: list[tuple[Hashable, str, bool]] = []
    if body.messages is not None:
        texts = [(k, t, _ROLES.get(role.lower()) in scope) for k, role, t in chat_texts(body.messages)]
    elif body.prompt is not None:
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # as ``_completions`` plans it
        if "completions" in scope:
            if isinstance(prompt, str):
                texts = [(_PROMPT, prompt, True)]
            elif all(isinstance(p, str) for p in prompt):
                texts = [((_PROMPT, k), p, True) for k, p in enumerate(prompt)]
    elif (shape := SHAPES.get(body.route)) is not None:
        reader = Reader(scope)
        shape.plan(body.top, body.raw, reader)
        texts = [(i, text, in_scope) for i, (text, in_scope) in enumerate(reader.texts)]
    reading.texts.update((key, text) for key, text, _ in texts)
    return texts
