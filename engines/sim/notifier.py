"""Eviction feedback from the simulated engine: coalesce evicted request ids and POST them to ``--evict-url``.

This plays the part of the in-engine hooks (``engines/hooks``): the request path only appends ids to a bounded
pending set (``submit`` never blocks and never does I/O); one background task wakes, waits a few milliseconds so
that bursts coalesce, and POSTs ``{"request_ids": [...]}`` with an optional bearer token. Failures are logged,
counted and retried with backoff a few times, then dropped and counted; nothing here can crash the engine.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
import msgspec

__all__ = ["EvictionNotifier", "NotifierStats"]

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
_MAX_BATCH = 4096
_MAX_ATTEMPTS = 3
_TIMEOUT = httpx.Timeout(5.0, connect=2.0)


@dataclass(frozen=True, slots=True)
class NotifierStats:
    posts_ok: int
    posts_failed: int
    ids_sent: int
    ids_dropped: int
    pending: int


class EvictionNotifier:
    """Background sender of evicted request ids; ``start`` and ``aclose`` run on the serving event loop."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        flush_interval_s: float = 0.005,
        max_pending: int = 100_000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = url
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._interval = flush_interval_s
        self._max_pending = max_pending
        self._transport = transport
        self._pending: dict[str, None] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._posts_ok = 0
        self._posts_failed = 0
        self._ids_sent = 0
        self._ids_dropped = 0

    def stats(self) -> NotifierStats:
        return NotifierStats(self._posts_ok, self._posts_failed, self._ids_sent, self._ids_dropped, len(self._pending))

    def submit(self, request_ids: list[str]) -> None:
        """Queue ids for the next POST; drops (and counts) what does not fit. Call from the event loop."""
        pending = self._pending
        for request_id in request_ids:
            if len(pending) >= self._max_pending:
                self._ids_dropped += 1
            else:
                pending[request_id] = None
        if self._task is None and not self._closing:
            self.start()
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-evict-notifier")
            if self._pending:
                self._wake.set()

    async def aclose(self, flush_timeout_s: float = 1.0) -> None:
        """Send what is pending (for at most ``flush_timeout_s``), then stop the task."""
        self._closing = True
        task, self._task = self._task, None
        if task is None:
            return
        if self._wake is not None:
            self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), flush_timeout_s)
        except TimeoutError:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                logger.warning("eviction notifier stopped with %d ids unsent", len(self._pending))

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        async with httpx.AsyncClient(timeout=_TIMEOUT, transport=self._transport) as client:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    await wake.wait()
                    wake.clear()
                    if not self._closing:
                        await asyncio.sleep(self._interval)
                if self._pending:
                    batch = list(self._pending)[:_MAX_BATCH]
                    for request_id in batch:
                        del self._pending[request_id]
                    await self._send(client, batch)

    async def _send(self, client: httpx.AsyncClient, batch: list[str]) -> None:
        body = _encoder.encode({"request_ids": batch})
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                response = await client.post(self._url, content=body, headers=self._headers)
            except httpx.HTTPError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            except Exception:
                # The edge of a background task: an unexpected error must cost this batch, never the engine.
                logger.exception("eviction POST of %d ids failed unexpectedly", len(batch))
                failure = "unexpected error"
            else:
                if response.is_success:
                    self._posts_ok += 1
                    self._ids_sent += len(batch)
                    return
                failure = f"HTTP {response.status_code}"
            self._posts_failed += 1
            logger.warning(
                "eviction POST of %d ids failed (attempt %d/%d): %s", len(batch), attempt, _MAX_ATTEMPTS, failure
            )
            if attempt < _MAX_ATTEMPTS and not self._closing:
                await asyncio.sleep(0.05 * 4 ** (attempt - 1))
        self._ids_dropped += len(batch)
