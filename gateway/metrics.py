"""Prometheus metrics, one registry per app (no process-global collectors)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from scheduler.index import IndexStats

__all__ = ["CONTENT_TYPE_LATEST", "IndexCollector", "Metrics", "watch_event_loop"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Every number the gateway exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "prefixgate_requests", "Requests answered, by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "prefixgate_request_duration_seconds",
            "Time from request start to the end of the response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "prefixgate_time_to_first_byte_seconds",
            "Time from request start to the first response body byte relayed",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter("prefixgate_upstream_errors", "Upstream failures by kind", ["kind"], registry=r)
        self.sse_oversized_events = Counter(
            "prefixgate_sse_oversized_events",
            "Upstream SSE events over 1 MiB, relayed unread as they arrived (no usage read, no citations mapped)",
            ["route"],
            registry=r,
        )
        self.in_flight = Gauge("prefixgate_in_flight_requests", "Proxied requests in progress", registry=r)
        self.disconnects = Counter(
            "prefixgate_client_disconnects", "Clients that went away before the response ended", registry=r
        )
        self.blocks_reordered = Counter(
            "prefixgate_reordered_requests", "Proxied requests whose blocks were reordered", registry=r
        )
        self.predicted_cached_blocks = Counter(
            "prefixgate_predicted_cached_blocks", "Blocks the live index predicted to be cached", registry=r
        )
        self.engine_cached_tokens = Counter(
            "prefixgate_engine_cached_tokens", "Cached prompt tokens reported by engines", ["route"], registry=r
        )
        self.engine_prompt_tokens = Counter(
            "prefixgate_engine_prompt_tokens", "Prompt tokens reported by engines", ["route"], registry=r
        )
        self.left_alone = Counter(
            "prefixgate_left_alone",
            "Requests whose blocks were left in place on purpose, by reason (see X-Prefixgate-Result)",
            ["reason"],
            registry=r,
        )
        self.groups_found = Counter(
            "prefixgate_groups_found", "Block groups found in proxied prompts, by format", ["format"], registry=r
        )
        self.blocks_found = Counter(
            "prefixgate_blocks_found",
            "Blocks in the groups found in proxied prompts, by format",
            ["format"],
            registry=r,
        )
        self.groups_reordered = Counter(
            "prefixgate_groups_reordered", "Block groups whose blocks were sent in a new order, by format", ["format"],
            registry=r,
        )  # fmt: skip
        self.groups_decided = Counter(
            "prefixgate_groups_meaning",
            "Block groups not simply renumbered, by format, decision (keep_labels, map, leave_alone; renumber when "
            "sent in an earlier turn's order) and reason",
            ["format", "decision", "reason"],
            registry=r,
        )
        self.stale_predictions = Counter(
            "prefixgate_stale_predictions",
            "Requests whose engine-reported cached tokens fell far below the index's prediction",
            registry=r,
        )
        self.stale_released = Counter(
            "prefixgate_stale_released",
            "Index entries released because engine feedback showed them evicted",
            registry=r,
        )

        self.intercept_skipped = Counter(
            "prefixgate_intercept_skipped",
            "Proxied requests with text forwarded unchanged without (complete) interception, by reason",
            ["reason"],
            registry=r,
        )

        self.planned_in_thread = Counter(
            "prefixgate_planned_in_thread",
            "Requests read in a worker thread (the planner's first phase), by reason: size (a big body) or slow_texts "
            "(reading its texts took the event loop's slice)",
            ["reason"],
            registry=r,
        )
        self.loop_stall = Gauge(
            "prefixgate_event_loop_stall_max_seconds",
            "Longest event-loop stall since start: how late a 10 ms timer fired, at worst",
            registry=r,
        )
        self.loop_busy = Gauge(
            "prefixgate_event_loop_busy_max_seconds",
            "Longest CPU time the event loop spent between two 10 ms timer ticks since start (its own work only)",
            registry=r,
        )
        self.gc_pause = Gauge(
            "prefixgate_gc_pause_max_seconds",
            "Longest cyclic garbage collection since start, by generation (CPU time; it holds up every request)",
            ["generation"],
            registry=r,
        )

        self.state_published = Counter(
            "prefixgate_state_published", "Index changes sent to the shared Redis stream", registry=r
        )
        self.state_applied = Counter(
            "prefixgate_state_applied", "Index changes of other gateways applied from the shared stream", registry=r
        )
        self.state_dropped = Counter(
            "prefixgate_state_dropped", "Index changes dropped while Redis was unreachable (queue full)", registry=r
        )
        self.state_errors = Counter(
            "prefixgate_state_errors",
            "Shared-state failures by kind (publish, follow, decode, invalid)",
            ["kind"],
            registry=r,
        )
        self.state_lag = Histogram(
            "prefixgate_state_lag_seconds",
            "From another gateway making an index change to this gateway applying it",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.state_stream_length = Gauge(
            "prefixgate_state_stream_length",
            "Entries in the shared Redis stream (bounded by --state-max-len)",
            registry=r,
        )

        # label children by (route, status) and route: ``labels()`` costs more than the update it finds
        self._answered: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._first_byte: dict[str, Histogram] = {}

    def answered(self, route: str, status: int, seconds: float) -> None:
        """Count one proxied request by route and status, and observe how long it took."""
        children = self._answered.get((route, status))
        if children is None:
            children = self._answered[route, status] = (
                self.requests.labels(route, str(status)),
                self.latency.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def first_byte(self, route: str, seconds: float) -> None:
        """Observe the time to the first response body byte relayed on ``route``."""
        child = self._first_byte.get(route)
        if child is None:
            child = self._first_byte[route] = self.ttfb.labels(route)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class IndexCollector(Collector):
    """The live index's size and eviction counters, read when ``/metrics`` is scraped (nothing on the hot path)."""

    def __init__(self, stats: Callable[[], IndexStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("prefixgate_index_requests", "Requests in the live index", value=stats.requests)
        yield GaugeMetricFamily("prefixgate_index_blocks", "Block positions in the live index", value=stats.nodes)
        evictions = CounterMetricFamily(
            "prefixgate_index_evictions", "Requests released from the live index, by cause", labels=["cause"]
        )
        evictions.add_metric(["engine"], stats.evictions)
        evictions.add_metric(["capacity"], stats.lru_evictions)
        yield evictions


async def watch_event_loop(metrics: Metrics, interval: float = 0.01) -> None:
    """Sleep ``interval`` again and again; whatever the wake-up is late by, the loop was busy with something else.

    Two measures: how late the timer fired (wall clock: includes time the OS gave to other processes), and how
    much CPU time the event loop's thread spent between two ticks (only the gateway's own work). While it runs,
    the longest garbage collection of each generation is recorded too: a full collection scans every tracked
    object (the planner's memo holds many) with the GIL held, one cause of a long tick.
    """
    pauses = _GcPauses(metrics)
    gc.callbacks.append(pauses)
    worst = worst_cpu = 0.0
    try:
        while True:
            started, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(interval)  # anyio's sleep looks the async library up on every call
            late = time.perf_counter() - started - interval
            busy = time.thread_time() - cpu
            if late > worst:
                worst = late
                metrics.loop_stall.set(worst)
            if busy > worst_cpu:
                worst_cpu = busy
                metrics.loop_busy.set(worst_cpu)
    finally:
        gc.callbacks.remove(pauses)


class _GcPauses:
    """A ``gc.callbacks`` entry: the longest collection per generation, in the collecting thread's CPU time."""

    def __init__(self, metrics: Metrics) -> None:
        self._gauges = [metrics.gc_pause.labels(str(generation)) for generation in range(3)]
        self._worst = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
            return
        generation = info["generation"]
        took = time.thread_time() - self._started
        if took > self._worst[generation]:
            self._worst[generation] = took
            self._gauges[generation].set(took)
