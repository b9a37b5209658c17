"""The event-loop watcher: it records the longest garbage collection per generation while it runs, and stops
recording when it stops."""

from __future__ import annotations

import gc

import anyio

from gateway.metrics import Metrics, watch_event_loop


def _pause(metrics: Metrics, generation: int) -> float:
    value = metrics.registry.get_sample_value("prefixgate_gc_pause_max_seconds", {"generation": str(generation)})
    assert value is not None
    return value


def test_full_collections_are_timed_while_the_watcher_runs() -> None:
    metrics = Metrics()
    callbacks = len(gc.callbacks)

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_event_loop, metrics)
            await anyio.sleep(0.02)
            assert len(gc.callbacks) == callbacks + 1
            garbage = [[] for _ in range(50_000)]  # something for the collection to scan
            gc.collect(2)
            del garbage
            tg.cancel_scope.cancel()

    anyio.run(run)
    assert _pause(metrics, 2) > 0
    assert len(gc.callbacks) == callbacks  # the watcher took its callback out when it stopped
    recorded = _pause(metrics, 2)
    gc.collect(2)
    assert _pause(metrics, 2) == recorded
