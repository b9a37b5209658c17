"""The simulated engine's state and cost model, independent of HTTP.

``SimEngine`` owns the tokenizer, the radix cache, the eviction sender, the request log and the counters. A job
is ``admit``-ted (prefix match, pin, modelled prefill delay, outputs generated deterministically from the prompt),
``prefilled`` (the prompt is cached under its request id) and ``finish``-ed (unpin; cache prompt + output, as SGLang
does for finished requests).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from engines.hooks.sender import EvictionReporter
from engines.sim.cache import Pin, RadixCache
from engines.sim.config import SimConfig
from engines.sim.protocol import Job
from engines.sim.tokenizer import Tokenizer

__all__ = ["Admission", "RecordedRequest", "SimEngine"]

_SYLLABLES: Final = ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu", "vo", "ze", "ba", "do", "fi", "gu", "ho", "je")
# 256 four-letter words: each is one tokenizer piece bare and one with a leading space, so generated text
# re-tokenises to exactly the generated ids (multi-turn chats hit the cached output of the previous turn).
_WORDS: Final = tuple(a + b for a in _SYLLABLES for b in _SYLLABLES)
_MASK64: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as received, kept for ``GET /sim/requests``."""

    method: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    received_at: float


@dataclass(slots=True)
class Admission:
    """What ``admit`` decided for a job: per prompt its request id, cached length and pin; the prefill delay."""

    request_ids: list[str]
    cached: list[int]
    pins: list[Pin]
    prefill_s: float
    prefill_ms: float
    outputs: list[list[int]] = field(default_factory=list)
    pieces: list[list[str]] = field(default_factory=list)


class SimEngine:
    """State of one simulated engine; every method runs on the serving event loop."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.tokenizer = Tokenizer()
        self.cache = RadixCache(config.capacity_tokens, config.max_owners_per_node)
        # The real engines' hook sender (a daemon thread; report() never blocks the loop), so that every test
        # and benchmark driving the simulated engine exercises the code that runs inside vLLM and SGLang.
        self.evictions: EvictionReporter | None = None
        if config.evict_url:
            self.evictions = EvictionReporter(
                config.evict_url,
                token=config.evict_token,
                exact_url=True,
                coalesce_s=config.evict_flush_ms / 1000,
                max_queue=config.evict_max_pending,
            )
        self.log: deque[RecordedRequest] = deque(maxlen=max(config.record_requests, 0))
        self.limits = (config.default_max_tokens, config.max_tokens_limit, config.max_n)
        self._bare_ids = [self.tokenizer.piece_id(w) for w in _WORDS]
        self._spaced_ids = [self.tokenizer.piece_id(" " + w) for w in _WORDS]
        self._spaced_text = [" " + w for w in _WORDS]
        self._busy_until = 0.0
        self.in_flight = 0
        self.reset_counters()

    def reset_counters(self) -> None:
        self.requests_total = 0
        self.errors_total = 0
        self.cancelled = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0

    def reset(self) -> None:
        """Clear the cache, the request log and the counters (in-flight requests finish normally)."""
        self.cache.reset()
        self.log.clear()
        self.reset_counters()

    def record(self, scope: Mapping[str, Any], body: bytes) -> None:
        if self.log.maxlen:
            query = scope.get("query_string", b"").decode("latin-1")
            headers = list(scope.get("headers", ()))
            self.log.append(RecordedRequest(scope["method"], scope["path"], query, headers, body, time.time()))

    def stats(self) -> dict[str, Any]:
        return {
            "model": self.config.model,
            "cache": self.cache.stats(),
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "recorded_requests": len(self.log),
            "evictions": None if self.evictions is None else {**self.evictions.stats, "queued": self.evictions.queued},
        }

    def admit(self, job: Job, request_ids: list[str]) -> Admission:
        """Match every prompt, pin its cached prefix for the request's lifetime, and price the uncached tokens.

        At least one prompt token is always computed (as vLLM and SGLang do), so an exact repeat reports
        ``len(prompt) - 1`` cached tokens. The prompt itself is cached by ``prefilled``, once its modelled prefill
        is over, so concurrent requests do not hit KV that is still being computed.
        """
        cache = self.cache
        cached, pins = [], []
        for prompt in job.prompts:
            cached.append(cache.match(prompt, max_len=len(prompt) - 1))
            pins.append(cache.pin(prompt))
        uncached = sum(len(p) for p in job.prompts) - sum(cached)
        prefill_s = self.config.prefill_us_per_token * uncached / 1e6
        delay = prefill_s
        if self.config.serial_prefill and prefill_s > 0:
            now = asyncio.get_running_loop().time()
            self._busy_until = max(self._busy_until, now) + prefill_s
            delay = self._busy_until - now
        self.requests_total += 1
        self.prompt_tokens += sum(len(p) for p in job.prompts)
        self.cached_tokens += sum(cached)
        admission = Admission(request_ids, cached, pins, delay, round(prefill_s * 1000, 3))
        self._generate(job, admission)
        return admission

    def _generate(self, job: Job, admission: Admission) -> None:
        """Outputs for every (prompt, sample) pair: words drawn from a generator seeded by the prompt."""
        spaced_ids, spaced_text = self._spaced_ids, self._spaced_text
        for prompt in job.prompts:
            base = zlib.crc32(array("I", prompt[-64:]).tobytes()) ^ (len(prompt) << 32)
            for sample in range(job.n):
                state = (base * 0x9E3779B97F4A7C15 + sample + 1) & _MASK64
                picks = []
                for _ in range(job.max_tokens):
                    state = (state * 6364136223846793005 + 1442695040888963407) & _MASK64
                    picks.append(state >> 56)
                ids = [spaced_ids[w] for w in picks]
                pieces = [spaced_text[w] for w in picks]
                if job.chat and picks:
                    ids[0] = self._bare_ids[picks[0]]
                    pieces[0] = _WORDS[picks[0]]
                admission.outputs.append(ids)
                admission.pieces.append(pieces)

    def prefilled(self, job: Job, admission: Admission) -> None:
        """The prefill is done: cache every prompt under its request id and move the pins onto the whole prompt."""
        cache = self.cache
        pins = []
        for prompt, request_id, pin in zip(job.prompts, admission.request_ids, admission.pins, strict=True):
            cache.insert(prompt, request_id)
            pins.append(cache.pin(prompt))
            cache.unpin(pin)
        admission.pins = pins
        self.publish_evictions()

    def finish(self, job: Job, admission: Admission, completed: bool) -> None:
        """Release the pins; a completed request caches prompt + output under its request id."""
        cache = self.cache
        for pin in admission.pins:
            cache.unpin(pin)
        admission.pins = []
        if completed:
            self.completion_tokens += sum(len(o) for o in admission.outputs)
            if self.config.cache_output and job.max_tokens:
                for index, output in enumerate(admission.outputs):
                    prompt_index = index // job.n
                    cache.insert(job.prompts[prompt_index] + tuple(output), admission.request_ids[prompt_index])
                self.publish_evictions()

    def publish_evictions(self) -> None:
        evicted = self.cache.drain_evicted()
        if evicted and self.evictions is not None:
            self.evictions.report(evicted)
