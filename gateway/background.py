"""The gateway's background work, supervised: run in the app's task group, restarted with backoff after an error.

Each task (a KV-event subscriber per engine endpoint, llama.cpp slot discovery) is a coroutine function that runs
until it is done or cancelled. An exception is logged with its traceback, counted, and the task starts again after
a backoff that doubles from ``initial_backoff_s`` up to ``max_backoff_s`` (and starts over once a run lasted
``healthy_after_s``). A task that returns is done and is not restarted. Cancellation (app shutdown) ends it.
``/metrics`` shows each task's liveness and restarts, and the KV-event stream's counters (gaps, replays, decode
errors, publisher restarts, ...), through :class:`BackgroundCollector`, read at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BackgroundCollector", "Supervisor", "TaskState"]

logger = logging.getLogger("prefixgate.background")


@dataclass(slots=True)
class TaskState:
    """What ``/metrics`` says about one supervised task."""

    name: str
    running: bool = False
    done: bool = False
    restarts: int = 0
    last_error: str | None = None


class Supervisor:
    """Starts named tasks in a task group and keeps them running."""

    def __init__(
        self, *, initial_backoff_s: float = 0.5, max_backoff_s: float = 30.0, healthy_after_s: float = 60.0
    ) -> None:
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self.tasks: dict[str, TaskState] = {}

    def start(self, group: TaskGroup, name: str, work: Callable[[], Awaitable[None]]) -> TaskState:
        """Run ``work`` in ``group`` under supervision; ``name`` labels it in logs and metrics."""
        if name in self.tasks:
            raise ValueError(f"a background task named {name!r} is already supervised")
        state = self.tasks[name] = TaskState(name)
        group.start_soon(self._supervise, state, work, name=name)
        return state

    async def _supervise(self, state: TaskState, work: Callable[[], Awaitable[None]]) -> None:
        backoff = self.initial_backoff_s
        while True:
            started = anyio.current_time()
            state.running = True
            try:
                await work()
            except Exception as exc:
                # The edge of a background task: anything it raises is logged and survived, never fatal.
                state.running = False
                state.restarts += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                if anyio.current_time() - started >= self.healthy_after_s:
                    backoff = self.initial_backoff_s
                logger.exception("background task %s failed; restart %d in %.1f s", state.name, state.restarts, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            finally:
                state.running = False
            state.done = True
            logger.debug("background task %s finished", state.name)
            return


class BackgroundCollector(Collector):
    """Supervised tasks and KV-event stream counters for ``/metrics``, read when it is scraped."""

    def __init__(self, supervisor: Supervisor, kv_counters: Callable[[], dict[str, int]]) -> None:
        self._supervisor = supervisor
        self._kv_counters = kv_counters

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "prefixgate_background_running",
            "1 while a background task runs; 0 while it waits to be restarted, or once a one-shot task finished",
            labels=["task"],
        )
        restarts = CounterMetricFamily(
            "prefixgate_background_restarts", "Background tasks restarted after an error", labels=["task"]
        )
        for state in self._supervisor.tasks.values():
            running.add_metric([state.name], 1 if state.running else 0)
            restarts.add_metric([state.name], state.restarts)
        yield running
        yield restarts
        kv = CounterMetricFamily(
            "prefixgate_kv_events",
            "KV-event stream counters, all subscribed engine endpoints together (gaps, replays, decode_errors, ...)",
            labels=["kind"],
        )
        for name, value in self._kv_counters().items():
            kv.add_metric([name], value)
        yield kv
