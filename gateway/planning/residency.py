"""What the gateway believes each engine holds: the live index, per-request group ids, and eviction.

One proxied request may carry several block groups (a system prompt and a tool result), each planned under
its own prefix key; the index files each group under its own id (``<rid>``, ``<rid>.g2``, ...). An engine
reports evictions by the request id the gateway stamped, possibly mangled (``chatcmpl-<rid>``, vLLM's
suffixes): ``evict`` resolves those and releases every group of the request, and its conversation history.

Ids that the index API hands out (``/reorder``, ``/schedule``, ``/insert``) are remembered per *owner* so that the
proxy honours them verbatim when a client sends one back: ids issued under the admin token (or on a gateway
without authentication) are honoured for every caller; ids issued to a client key only for that key. Each
owner has its own bounded pool, so one caller cannot push another's ids out.

Single writer: every method runs on the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import gcd
from typing import Any, Protocol

from cachetools import LRUCache

from engines.llamacpp.slots import SlotTable
from gateway.settings import tokenizer_file
from scheduler.dedup import ConversationTracker
from scheduler.ids import normalize_request_ids
from scheduler.index import LiveIndex
from scheduler.prefixes import CHUNK_BYTES, Hashes, PrefixIndex, common

__all__ = [
    "BlockTokens",
    "CacheGranularity",
    "Change",
    "EvictOutcome",
    "IndexView",
    "Residency",
    "TokenRate",
    "estimate_tokens",
]

_CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    """The tokens ``chars`` characters of prompt are estimated to make (~4 per token, the gateway's one estimate:
    predictions, the result header, a replica's load and its ranking)."""
    return chars // _CHARS_PER_TOKEN


Change = tuple[Any, ...]
"""An index change for replication: ``("commit", request_id, groups)``, ``("evict", request_ids)``, ``("reset",)``."""


@dataclass(slots=True)
class EvictOutcome:
    """The ``/evict`` answer in ContextPilot's field names."""

    normalized_request_ids: list[str]
    evicted_request_ids: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    conversations_cleared: int = 0

    @property
    def removed_count(self) -> int:
        return len(self.evicted_request_ids)


class TokenRate:
    """How many bytes of prompt (as the gateway feeds it: each message's role and text, in order) one replica's
    engine counts as a token, learned from the ``prompt_tokens`` it reports for the prompts it was sent.

    A prediction is a position in the prompt's bytes; the tokens before it depend on the engine's tokenizer
    (English prose ~4 bytes a token, code or rare words far fewer). Until ``WARM`` reports arrived the gateway's
    one estimate (``estimate_tokens``) stands; then the rate over the last ``WINDOW`` prompts.

    With ``--tokenizer`` every text of a prompt is counted exactly (``BlockTokens``) and what is left is the chat
    template the engine wraps them in (``<|im_start|>system``...): a few tokens per text whatever the bytes the
    gateway fed around it, so those are learned per *run* of uncounted bytes (one before each text, one for the
    generation prompt) instead (``learn_runs``, ``run_tokens``).
    """

    WINDOW = 32
    WARM = 4

    __slots__ = ("_reports", "_runs")

    def __init__(self) -> None:
        self._reports: deque[tuple[int, int]] = deque(maxlen=self.WINDOW)
        self._runs: deque[tuple[int, int]] = deque(maxlen=self.WINDOW)

    def learn(self, prompt_bytes: int, prompt_tokens: int) -> None:
        """One prompt of ``prompt_bytes`` that the engine counted as ``prompt_tokens``."""
        if prompt_bytes > 0 and prompt_tokens > 0:
            self._reports.append((prompt_bytes, prompt_tokens))

    def tokens(self, prompt_bytes: int) -> int:
        """The tokens the engine is expected to count in the first ``prompt_bytes`` bytes of a prompt."""
        reports = self._reports
        if len(reports) < self.WARM:
            return estimate_tokens(prompt_bytes)
        return prompt_bytes * sum(t for _, t in reports) // sum(b for b, _ in reports)

    def learn_runs(self, runs: int, tokens: int) -> None:
        """A prompt whose texts were all counted: ``tokens`` more than their count, around ``runs`` of them."""
        if runs > 0 and tokens >= 0:
            self._runs.append((runs, tokens))

    def run_tokens(self, runs: int) -> int | None:
        """The template tokens expected in the first ``runs`` runs of a prompt, at the prompts' average per run rounded
        down (None until ``WARM`` prompts were learned). Runs do not weigh alike: the first closes no earlier message
        (ChatML: ``<|im_start|>system\n`` against ``<|im_end|>\n<|im_start|>user\n``), so it weighs less than the
        average, and the prefix a prediction ends in always holds the first. The reports of cached tokens could bound
        it better, but under concurrency (a prefix still being computed) and eviction they mislead as often."""
        reports = self._runs
        if len(reports) < self.WARM:
            return None
        return runs * sum(t for _, t in reports) // sum(r for r, _ in reports)


class BlockTokens:
    """Exact token counts of the pieces of a prompt's texts, with the served model's tokenizer (``--tokenizer``: its
    ``tokenizer.json``, read by the ``tokenizers`` package), each piece counted once (an LRU of ``size`` counts).

    A rate of bytes per token is right on average, but a prediction is rounded down to the engine's whole blocks
    (vLLM: 16 or 128 tokens), so an estimate a few tokens off near a block's end is a block off: on the vLLM
    bench's text no single rate gets more than 86% of the predictions to the right block. With every text counted
    (documents and the template bytes between them apart, ``Planner._count``), only the chat template the engine
    wraps the texts in is estimated (``TokenRate.run_tokens``)."""

    def __init__(self, path: str | None, size: int = 65_536) -> None:
        self._tokenizer: Any = None
        self._counts: LRUCache[int, int] = LRUCache(maxsize=size)
        self.source: str | None = None  # the tokenizer.json (or model directory) counted with
        if path:
            self.load(path)

    @property
    def ready(self) -> bool:
        """Whether a tokenizer is loaded (``--tokenizer auto`` loads one once an engine names its model)."""
        return self._tokenizer is not None

    def load(self, path: str) -> None:
        """Count with the ``tokenizer.json`` at ``path`` (or in the model directory ``path``)."""
        from tokenizers import Tokenizer  # the 'tokenizer' extra (checked at start by Settings)

        self._tokenizer = Tokenizer.from_file(tokenizer_file(path))
        self._counts.clear()
        self.source = path

    def count(self, text: str) -> int:
        """The tokens ``text`` makes on its own (no special tokens)."""
        key = hash(text)
        counted = self._counts.get(key)
        if counted is None:
            counted = self._counts[key] = len(self._tokenizer.encode(text, add_special_tokens=False).ids)
        return counted


class CacheGranularity:
    """How many tokens one replica's engine caches in (its KV block), learned from the ``cached_tokens`` it reports.

    vLLM reports whole blocks (16 tokens on GPUs, 128 on the CPU build) while the gateway predicts a token
    estimate, so a prediction is rounded down to the granularity before it is compared with a report (the result
    header's ``predicted_cached_tokens``, ``prefixgate_stale_predictions``). SGLang and llama.cpp report exact
    counts: their granularity learns to 1. The granularity is the largest common divisor (1 to ``MAX_TOKENS``) of
    the last ``WINDOW`` non-zero reports, all but one in eight of them, so an odd report does not undo it, and halved
    while few reports confirm it (an engine caching in 128-token blocks reports four multiples of 256 in a row one
    time in sixteen); it stays
    1 until ``WARM`` reports were seen, and is worked out again when a report disagrees and every ``WARM`` reports.
    """

    MAX_TOKENS = 1024
    WINDOW = 32
    WARM = 4
    CONFIRM = 8  # reports that a block of g tokens needs before it is not taken for g/2 (``_confirmed``)

    __slots__ = ("_halved", "_reports", "_seen", "tokens")

    def __init__(self) -> None:
        self.tokens = 1
        self._reports: deque[int] = deque(maxlen=self.WINDOW)
        self._seen = 0
        self._halved = False  # the granularity is smaller than the reports say, for want of reports: learn on each

    def learn(self, cached_tokens: int) -> None:
        """One report of the engine (zero says nothing of its granularity)."""
        if cached_tokens <= 0:
            return
        reports = self._reports
        reports.append(cached_tokens)
        self._seen += 1
        if len(reports) >= self.WARM and (cached_tokens % self.tokens or self._seen % self.WARM == 0 or self._halved):
            self.tokens = self._divisor(reports)

    def floor(self, tokens: int) -> int:
        """``tokens`` rounded down to whole cache blocks."""
        return tokens - tokens % self.tokens

    def _divisor(self, reports: Sequence[int]) -> int:
        """The largest divisor up to ``MAX_TOKENS`` of all the reports but one in eight (bounded: WINDOW² gcds).
        Fewer than eight reports tolerate no odd one: a granularity too large would round predictions too far down."""
        spare = len(reports) // 8
        values = list(reports)
        candidates = {gcd(a, b) for i, a in enumerate(values) for b in values[i + 1 :]}
        bounded = {c if c <= self.MAX_TOKENS else _divisor_up_to(c, self.MAX_TOKENS) for c in candidates}
        for candidate in sorted((c for c in bounded if c > 1), reverse=True):
            if sum(1 for r in values if r % candidate) <= spare:
                # a report that is an odd multiple of half the candidate is evidence, not an odd report
                chosen = candidate
                while chosen % 2 == 0 and any(r % chosen and r % (chosen // 2) == 0 for r in values):
                    chosen //= 2
                return self._confirmed(chosen, sum(1 for r in values if r % chosen == 0))
        return 1

    def _confirmed(self, candidate: int, reports: int) -> int:
        """``candidate`` halved until ``reports`` multiples of it make a finer truth unlikely: an engine caching in
        blocks of g/2 reports n multiples of g in a row with probability 2^-n, one of g/4 with 4^-n; halved k times,
        the chance that the truth is finer still is at most 2^-(k+1)n, and k is the least that makes it 2^-CONFIRM
        at most. A granularity too large rounds predictions a block short; one too small, by less than a block."""
        halvings = max(0, -(-self.CONFIRM // reports) - 1)
        self._halved = halvings > 0
        while halvings and candidate % 2 == 0:
            candidate, halvings = candidate // 2, halvings - 1
        return candidate


def _divisor_up_to(value: int, most: int) -> int:
    """The largest divisor of ``value`` that is at most ``most``."""
    return next(d for d in range(most, 0, -1) if value % d == 0)


class IndexView(Protocol):
    """What a request is planned against: the replica it goes to is chosen by an explicit call, ``choose``, with
    the request's first block groups (``(prefix key, block ids)``; none when it has no group), once, on the event
    loop; every index lookup of the plan then reads the chosen replica's ``Residency``. A ``Residency`` is its own
    view (one replica); ``gateway.upstream.router.ReplicaChoice`` ranks the healthy replicas."""

    def choose(self, groups: Sequence[tuple[Hashable, Sequence[int]]]) -> Residency: ...


class Residency:
    """The live index plus the request-level bookkeeping around it (an ``IndexView`` of one replica)."""

    def __init__(self, *, max_requests: int, stateless: bool, max_chunks: int = 1 << 16) -> None:
        self.stateless = stateless
        self.index = LiveIndex(max_requests=max_requests)
        self.prefixes = PrefixIndex(max_chunks)  # every prompt sent, recognised blocks or not (chunk names)
        self.granularity = CacheGranularity()  # what the engine's cached_tokens come in (``PlannedRequest.usage``)
        self.rate = TokenRate()  # the prompt bytes the engine counts as a token (``PlannedRequest.usage``)
        self.slots: SlotTable | None = None  # llama.cpp: its slots hold the prompts (``Planner.use_slots``)
        self.reuse_overwrites = False  # the engine's (``EngineAdapter.reuse_overwrites``: llama.cpp)
        # llama.cpp left to its own slot choice: the last prompts sent, one per slot (``overwrites``)
        self.in_slots: deque[Hashes] | None = None
        self.conversations: ConversationTracker[Hashable] = ConversationTracker(max_requests=max_requests)
        self._groups: LRUCache[str, tuple[str, ...]] = LRUCache(maxsize=max_requests)
        self._max_requests = max_requests
        self._issued: dict[str | None, LRUCache[str, None]] = {}
        self._reset_hooks: list[Callable[[], None]] = []
        self.evict_calls = 0
        self.on_change: Callable[[Change], None] | None = None  # gateway.state.replication publishes changes
        # where each committed block ends in tokens, per request: kept where KV events shorten requests (``shorten``)
        self.extents: LRUCache[str, tuple[tuple[int, ...], ...]] | None = None

    def choose(self, groups: Sequence[tuple[Hashable, Sequence[int]]]) -> Residency:
        """One replica: a request planned against this residency goes to it (``IndexView``)."""
        return self

    def on_reset(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` on every reset (state derived from the index, such as the planner's memo)."""
        self._reset_hooks.append(hook)

    def commit(self, request_id: str, groups: Sequence[tuple[Hashable, Sequence[int]]]) -> None:
        """Record a request the engine accepted, one ``(key, ordered blocks)`` per block group."""
        if self.stateless or not groups:
            return
        ids = self.group_ids(request_id, len(groups))
        for group_id, (key, blocks) in zip(ids, groups, strict=True):
            self.index.commit(key, group_id, blocks)
        if len(ids) > 1:
            self._groups[request_id] = tuple(ids[1:])
        if self.on_change is not None:
            self.on_change(("commit", request_id, groups))

    def sent(self, chain: Sequence[int], marks: Sequence[int] = ()) -> None:
        """The engine was sent a whole prompt with these chunk names and paragraph marks (``scheduler.prefixes``)."""
        if not self.stateless and (chain or marks):
            self.prefixes.add(chain, marks)
            if self.in_slots is not None and chain:
                self.in_slots.append(tuple(chain))

    def overwrites(self, chain: Hashes, held: int, as_sent: int) -> bool:
        """Whether a rewrite, whose prompt has the chunk names ``chain`` and is held for ``held`` characters (the prompt
        as sent: ``as_sent``), gains only by a prompt that llama.cpp, left to its own slot choice, keeps in its
        host-RAM cache alone (not in a slot: one of the last prompts sent, ``in_slots``), and not whole.

        llama.cpp keeps each prompt once: a request that shares a quarter of a prompt in that cache takes it back
        into a slot, out of the cache, and overwrites the rest of it with its own (``server_prompt_cache::load``).
        A prompt in a slot is saved to the cache first where the request keeps less than half of it. So a rewrite
        that reaches only such a prompt trades the rest of it for what it gains, and a repeat of that prompt later
        finds the part this one shared (``bench apps --sets repeat``, seed 4: LlamaIndex 0.81x of direct). Direct
        traffic pays that only where the client's own order shares it; a rewrite is left to it. A prompt sent
        again whole, or continued (a conversation's next turn), overwrites nothing."""
        if self.in_slots is None or held <= as_sent or held >= (len(chain) - 1) * CHUNK_BYTES:
            return False
        return held > max((common(sent, chain) for sent in self.in_slots), default=0) * CHUNK_BYTES

    def holds(self, mark: int) -> bool:
        """Whether a prompt sent went on to exactly this point (a ``Chain.mark``; not known of llama.cpp's slots)."""
        return self.slots is None and self.prefixes.holds(mark)

    def held_chars(self, chain: Sequence[int]) -> int:
        """How much of a prompt (its chunk names) the engine is believed to hold, in characters: what its slots
        hold on a llama-server (one prompt each), else what the prefix index remembers of everything sent."""
        held = self.slots.held(chain) if self.slots is not None else self.prefixes.match(chain)
        return held * CHUNK_BYTES

    def issue(self, request_ids: Iterable[str], owner: str | None = None) -> None:
        """Remember ids the index API handed out to ``owner`` (a key namespace; None: the admin or nobody)."""
        pool = self._issued.get(owner)
        if pool is None:
            pool = self._issued[owner] = LRUCache(maxsize=self._max_requests)
        for request_id in request_ids:
            pool[request_id] = None

    def issued(self, request_id: str, namespace: str | None = None) -> bool:
        """Whether a caller with key ``namespace`` may use ``request_id`` as it is (see the module docstring)."""
        shared = self._issued.get(None)
        if shared is not None and request_id in shared:
            return True
        own = self._issued.get(namespace) if namespace is not None else None
        return own is not None and request_id in own

    def issued_to(self, request_id: str, owner: str) -> bool:
        """Whether ``request_id`` was issued to ``owner`` itself."""
        pool = self._issued.get(owner)
        return pool is not None and request_id in pool

    @staticmethod
    def group_ids(request_id: str, count: int) -> list[str]:
        """The index ids of a request's ``count`` block groups: ``<rid>``, ``<rid>.g2``, ..."""
        return [request_id] + [f"{request_id}.g{i}" for i in range(2, count + 1)]

    def track_extents(self) -> None:
        """Keep where each committed request's blocks end in tokens, for ``shorten`` (a KV-event stream is wired)."""
        if self.extents is None:
            self.extents = LRUCache(maxsize=self._max_requests)

    def shorten(self, held: Mapping[str, int]) -> None:
        """The engine evicted the tail of these requests' prompts and still holds their first ``held[id]`` tokens
        (KV events, ``KVEventTracker.on_shortened``): their paths in the index keep the blocks that end within
        those tokens. Without this, a prompt is held whole until its last block goes, and every request routed and
        predicted on it expects blocks the engine no longer has."""
        extents = self.extents
        if extents is None:
            return
        for raw, tokens in held.items():
            request_id = self.index.resolve(raw) or raw
            ends = extents.get(request_id)
            if ends is None:
                continue
            # a block the engine holds only the start of is dropped: predictions stay within what it holds (keeping
            # it instead predicted a block or two over as often as this predicts under, on bench peers)
            for group_id, group in zip(self.group_ids(request_id, len(ends)), ends, strict=True):
                self.index.shorten(group_id, sum(1 for end in group if end <= tokens))

    def release_groups(self, request_id: str) -> list[str]:
        """Every index id filed for ``request_id``."""
        return [request_id, *self._groups.pop(request_id, ())]

    def evict(self, raw_ids: Iterable[str]) -> EvictOutcome:
        """Release requests reported evicted; idempotent; mangled engine ids are resolved."""
        self.evict_calls += 1
        normalized = normalize_request_ids(raw_ids)
        outcome = EvictOutcome(normalized_request_ids=normalized)
        for raw in normalized:
            request_id = self.index.resolve(raw) or raw
            cleared = self.conversations.clear(request_id)
            outcome.conversations_cleared += int(cleared)
            result = self.index.evict(self.release_groups(request_id))
            if result.evicted or cleared:
                outcome.evicted_request_ids.append(request_id)
            else:
                outcome.not_found.append(raw)
        if self.on_change is not None and outcome.evicted_request_ids:
            self.on_change(("evict", outcome.evicted_request_ids))
        return outcome

    def reset(self) -> None:
        self.index.reset()
        self.prefixes.clear()
        if self.extents is not None:
            self.extents.clear()
        if self.slots is not None:
            self.slots.clear()
        if self.in_slots is not None:
            self.in_slots.clear()
        self.conversations.reset()
        self._groups.clear()
        self._issued.clear()
        for hook in self._reset_hooks:
            hook()
        if self.on_change is not None:
            self.on_change(("reset",))
