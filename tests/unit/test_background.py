"""The supervisor of the gateway's background tasks: errors restart a task with backoff, a finished task stays done."""

from __future__ import annotations

import itertools

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.background import BackgroundCollector, Supervisor

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_failing_task_is_restarted_with_growing_backoff() -> None:
    supervisor = Supervisor(initial_backoff_s=0.01, max_backoff_s=0.04)
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(anyio.current_time())
        if len(starts) <= 4:
            raise RuntimeError(f"failure {len(starts)}")
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        state = supervisor.start(tg, "flaky", flaky)
        with anyio.fail_after(5):
            while len(starts) < 5:
                await anyio.sleep(0.005)
        await anyio.sleep(0.01)
        assert state.running and not state.done
        assert state.restarts == 4 and state.last_error == "RuntimeError: failure 4"
        tg.cancel_scope.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02 and gaps[2] >= 0.04 and gaps[3] >= 0.04  # capped at max_backoff_s
    assert not state.running


async def test_a_task_that_returns_is_done_and_not_restarted() -> None:
    supervisor = Supervisor(initial_backoff_s=0.01)
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    async with anyio.create_task_group() as tg:
        state = supervisor.start(tg, "once", once)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert (runs, state.done, state.running, state.restarts) == (1, True, False, 0)


async def test_names_are_unique() -> None:
    supervisor = Supervisor()
    async with anyio.create_task_group() as tg:
        supervisor.start(tg, "x", anyio.sleep_forever)
        with pytest.raises(ValueError, match="already supervised"):
            supervisor.start(tg, "x", anyio.sleep_forever)
        tg.cancel_scope.cancel()


async def test_metrics_show_liveness_restarts_and_kv_counters() -> None:
    supervisor = Supervisor(initial_backoff_s=10)
    registry = CollectorRegistry()
    registry.register(BackgroundCollector(supervisor, lambda: {"gaps": 3, "decode_errors": 1}))

    async def broken() -> None:
        raise OSError("no route")

    async with anyio.create_task_group() as tg:
        supervisor.start(tg, "kv-events tcp://e:5557", broken)
        supervisor.start(tg, "llamacpp-slots", anyio.sleep_forever)
        await anyio.sleep(0.02)
        text = generate_latest(registry).decode()
        tg.cancel_scope.cancel()
    assert 'prefixgate_background_running{task="kv-events tcp://e:5557"} 0.0' in text
    assert 'prefixgate_background_restarts_total{task="kv-events tcp://e:5557"} 1.0' in text
    assert 'prefixgate_background_running{task="llamacpp-slots"} 1.0' in text
    assert 'prefixgate_kv_events_total{kind="gaps"} 3.0' in text
    assert 'prefixgate_kv_events_total{kind="decode_errors"} 1.0' in text
