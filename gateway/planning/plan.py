"""What the planner decided for one proxied request, and what runs as the upstream answers it.

A ``PlannedRequest`` carries the body fields to replace and the ``X-Prefixgate-Result`` header, and three steps
the proxy runs on the event loop: ``accept`` (the engine took the request: commit what it was sent to the live
index, and record the llama.cpp slot it now holds), ``usage`` (the cached tokens the answer reported: release
index entries the engine no longer holds) and ``finish`` (the upstream is done: free the slot).

``RequestPlanner`` is what the proxy plans with (``gateway.planning.planner.Planner``, or
``gateway.upstream.router.Router`` with several replicas), in two phases: ``read`` (no index, any thread) and
``plan`` (on the event loop); a plan made by the router also carries its ``Upstream``
(the replica's client and engine) and its ``Routing`` (the replica's load and health while the request is in
flight, ``gateway.upstream.router.Route``), which the plan's steps tell what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from engines.base import EngineAdapter
from engines.llamacpp.slots import SlotTable
from gateway.metrics import Metrics
from gateway.planning.residency import Residency, estimate_tokens
from gateway.wire.walk import AnswerRewriter
from scheduler.prefixes import Hashes

if TYPE_CHECKING:
    from gateway.planning.outcome import Choice
    from gateway.planning.texts import Reading
    from gateway.upstream.sender import UpstreamSender
    from gateway.wire.chat import RequestBody

__all__ = ["PlannedRequest", "Prediction", "RequestPlanner", "Routing", "Upstream", "estimate_tokens"]

logger = logging.getLogger("prefixgate.planner")

Path = tuple[tuple[Hashable, tuple[int, ...]], ...]
"""What a request holds: its block groups as ``(prefix key, blocks in sent order)``, in prompt order."""
Prediction = tuple[Hashable, tuple[int, ...]]  # (prefix key, the blocks predicted cached under it)
_MIN_PREDICTED_CHARS = 400
_STALE_FRACTION = 0.25
_RUN_BYTES = 256  # uncounted bytes per run, at most, for a prompt to count as wholly counted (``exact``)


class PlannedRequest:
    """What the planner decided for one request, and what to run as the upstream answers it.

    ``fields`` are the body fields to replace, ``result`` the ``X-Prefixgate-Result`` header, ``answer`` (citation
    mapping) what rewrites the answer's citation numbers. The proxy calls
    ``accept`` when the engine accepts the request (what it was sent is now in its cache), ``usage`` with the
    cached-token count the answer reports, and ``finish`` once the upstream is done with it (always, at most
    once effective). All three run on the event loop.
    """

    __slots__ = ("answer", "chain", "choices", "commits", "counted", "exact", "extents", "fields", "marks", "metrics",
                 "predicted_chars", "predictions", "prompt_chars", "request_id", "residency", "result", "routing",
                 "slot", "slot_known", "slots", "upstream")  # fmt: skip

    def __init__(
        self,
        request_id: str,
        residency: Residency,
        metrics: Metrics,
        result: dict[str, Any],
        *,
        commits: Path = (),
        predictions: Sequence[Prediction] = (),
        predicted_chars: int = 0,
        prompt_chars: int = 0,
        chain: Hashes = (),
        marks: Hashes = (),
        counted: Sequence[tuple[int, int, int]] = (),
        extents: Sequence[tuple[int, ...]] = (),
    ) -> None:
        self.request_id = request_id
        self.residency = residency
        self.metrics = metrics
        self.result = result
        self.fields: dict[str, Any] = {}
        self.commits = commits  # (prefix key, blocks in sent order) per block group, in prompt order
        self.predictions = predictions
        self.predicted_chars = predicted_chars  # how far into the prompt the predicted cached prefix reaches
        self.prompt_chars = prompt_chars  # the whole prompt's bytes, as the planner fed them (0: not walked)
        self.counted = counted  # with --tokenizer: the prompt's counted pieces (end, chars, exact tokens), in order
        self.extents = extents  # per commit, where each block ends in the prompt (characters fed)
        # whether --tokenizer counted every text of the prompt: what is left is at most ``_RUN_BYTES`` per run (roles,
        # the route and model the prefix key was fed), so the engine's template is what it adds
        chars, _, runs = next(_counted(counted, (prompt_chars,)))
        self.exact = bool(counted) and prompt_chars - chars <= _RUN_BYTES * runs
        self.slots: SlotTable | None = None  # llama.cpp: the slot this request was pinned to
        self.slot: int | None = None
        self.slot_known = True  # False: sent without ``id_slot``, ``slot`` is where llama.cpp is believed to put it
        self.chain = chain  # the chunk names of the whole prompt as forwarded (``scheduler.prefixes``)
        self.marks = marks  # and its paragraph marks, where the planner walked it as forwarded
        self.answer: AnswerRewriter | None = None  # rewrites the answer (citation numbers or positions back)
        self.choices: Sequence[Choice] = ()  # per group: format, decision, sent and forwarded order (decision log)
        self.upstream: Upstream | None = None  # where it goes: set by the router (``gateway.upstream.router``)
        self.routing: Routing | None = None  # the router's bookkeeping for that replica, set with ``upstream``
        if "predicted_cached_tokens" in result:  # in the whole blocks the engine reports
            result["predicted_cached_tokens"] = self.predicted_tokens

    @property
    def predicted_tokens(self) -> int:
        """The predicted cached tokens, rounded down to what the replica's engine caches in (its learned
        ``CacheGranularity``): what the result header says and ``usage`` compares with the engine's report."""
        (reach,) = self._tokens_at((self.predicted_chars,))
        return self.residency.granularity.floor(reach)

    def _tokens_at(self, reaches: Sequence[int]) -> list[int]:
        """The tokens the engine counts in the prompt's first ``reach`` characters, for each of ``reaches`` (in
        order, one pass): the texts counted exactly with --tokenizer, the rest estimated (``TokenRate``)."""
        rate, out = self.residency.rate, []
        for reach, (chars, tokens, runs) in zip(reaches, _counted(self.counted, reaches), strict=True):
            template = rate.run_tokens(runs) if self.exact else None
            out.append(tokens + (template if template is not None else rate.tokens(reach - chars)))
        return out

    def accept(self) -> None:
        """The engine accepted the request: record what its cache now holds."""
        if self.routing is not None:
            self.routing.accepted(self)
        if self.slots is not None and self.slot is not None:
            previous = self.slots.occupy(self.slot, self.request_id, self.chain, known=self.slot_known)
            if previous is not None:  # the previous holder's tail is overwritten
                self.residency.evict([previous])
        residency = self.residency
        if residency.extents is not None and self.extents:  # the engine's evictions shorten what it holds
            tokens = iter(self._tokens_at([end for ends in self.extents for end in ends]))
            residency.extents[self.request_id] = tuple(tuple(next(tokens) for _ in ends) for ends in self.extents)
        residency.commit(self.request_id, self.commits)
        residency.sent(self.chain, self.marks)

    def usage(self, cached_tokens: int | None, prompt_tokens: int | None = None) -> None:
        """Engine feedback: far fewer cached tokens than predicted means the index holds evicted entries.

        Every report teaches the replica's cache granularity, and the prompt tokens how many of the prompt's bytes
        its engine counts as a token (``TokenRate``). The prediction (``predicted_tokens``, in the
        engine's whole blocks) is compared with the report: below a quarter of it, every other request whose
        committed path runs through the predicted prefix is released, since the engine no longer holds it
        (``prefixgate_stale_predictions``).
        """
        if prompt_tokens is not None and self.prompt_chars:
            # with exact counts the rate is learned on the rest of the prompt, which it estimates; with every text
            # counted, the rest is the template: learned per run (one before each text, one for the generation prompt)
            chars, tokens, runs = next(_counted(self.counted, (self.prompt_chars,)))
            if self.exact:
                self.residency.rate.learn_runs(runs + 1, prompt_tokens - tokens)
            else:
                self.residency.rate.learn(self.prompt_chars - chars, prompt_tokens - tokens)
        if cached_tokens is None:
            return
        self.residency.granularity.learn(cached_tokens)
        if self.predicted_chars < _MIN_PREDICTED_CHARS or cached_tokens >= self.predicted_tokens * _STALE_FRACTION:
            return
        self.metrics.stale_predictions.inc()
        index = self.residency.index
        own = set(self.residency.group_ids(self.request_id, len(self.commits)))
        stale = [
            rid for key, blocks in self.predictions for rid in index.requests_sharing(key, blocks) if rid not in own
        ]
        if stale:
            self.metrics.stale_released.inc(len(index.evict(stale).evicted))
            logger.info("engine reported %d cached tokens, far below the prediction: released %d", cached_tokens,
                        len(stale))  # fmt: skip

    def responded(self, status: int) -> None:
        """The upstream's answer head came with ``status`` (a router's plan counts it for its replica's health)."""
        if self.routing is not None:
            self.routing.responded(status)

    def failed(self, reason: str) -> None:
        """The upstream failed the request: timed out, broke the connection, answered nonsense (likewise)."""
        if self.routing is not None:
            self.routing.failed(reason)

    def reroute(self, body: RequestBody, headers: Mapping[str, str]) -> PlannedRequest | None:
        """The request could not be sent to its upstream: the same request planned for the next one, or None (a
        router's plan has replicas to try; one planned for one upstream has none)."""
        return self.routing.reroute(self, body, headers) if self.routing is not None else None

    def finish(self) -> None:
        """The upstream is done with the request: free its llama.cpp slot and its replica's load (once, however
        often called)."""
        if self.routing is not None:
            self.routing.finished()
        slots, self.slots = self.slots, None
        if slots is not None and self.slot is not None:
            slots.finish(self.slot)


class RequestPlanner(Protocol):
    """``gateway.planning.planner.Planner`` (one upstream) or ``gateway.upstream.router.Router`` (several replicas)."""

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
        """The first phase, without the live index: may run in a worker thread."""

    def plan(self, reading: Reading, request_id: str) -> PlannedRequest:
        """The second phase, on the event loop."""


class Routing(Protocol):
    """The router's part of a plan made for one replica (``gateway.upstream.router.Route``): told by the plan's
    steps what happened to the request, for the replica's load, health and affinity (on the event loop)."""

    def accepted(self, planned: PlannedRequest) -> None: ...

    def responded(self, status: int) -> None: ...

    def failed(self, reason: str) -> None: ...

    def finished(self) -> None: ...

    def reroute(
        self, planned: PlannedRequest, body: RequestBody, headers: Mapping[str, str]
    ) -> PlannedRequest | None: ...


class Upstream(Protocol):
    """Where a request goes: an engine replica's pooled client and engine kind (``gateway.upstream.replicas``). A plan
    made by the router (``gateway.upstream.router``) carries one as ``planned.upstream``, and ``planned.reroute`` plans
    it for the next replica."""

    name: str
    client: httpx.AsyncClient
    sender: UpstreamSender
    engine: EngineAdapter


def _counted(counted: Sequence[tuple[int, int, int]], reaches: Iterable[int]) -> Iterator[tuple[int, int, int]]:
    """For each of ``reaches`` (in order, one pass): the characters and exact tokens of the counted pieces that end
    within the prompt's first ``reach`` characters, and the runs of uncounted bytes before them (before each text:
    its role, and the template the engine wraps it in)."""
    chars = tokens = runs = last = i = 0
    for reach in reaches:
        while i < len(counted) and counted[i][0] <= reach:
            end, size, count = counted[i]
            runs += end - size != last
            chars, tokens, last, i = chars + size, tokens + count, end, i + 1
        yield chars, tokens, runs
