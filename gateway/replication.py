"""Several gateways, one view: index changes replicated through a Redis Stream (``--state redis://...``).

Each gateway keeps planning on its own in-memory index and appends every change it makes — a request committed
to a replica, requests evicted from it, a replica's index reset — to one Redis Stream (``XADD ... MAXLEN ~ N``,
so the stream stays bounded). Every gateway follows the stream (``XREAD BLOCK`` from the last id it applied) and
applies the other gateways' changes to its own index, so an eviction reported to gateway A releases the entry
in B, and a request planned in B sees what A sent. A gateway that starts (or restarts) late reads the stream from
its beginning and so catches up with what is still retained. Redis orders the changes; there is no consensus of
our own. Replicas are named in the stream by URL, so gateways must front the same replicas (any order).

Nothing here is on the request path: a change is put on a bounded in-memory queue (oldest dropped and counted
when Redis is away) and a background task sends queued changes in one pipeline. Lag (from the producing
gateway's clock to applying here) and the stream length are exported as metrics.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Hashable
from typing import Any

import anyio
import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.metrics import Metrics
from gateway.replicas import Replica, ReplicaSet
from gateway.residency import Change

__all__ = ["Replication"]

logger = logging.getLogger("prefixgate.replication")

STREAM = "prefixgate:index"
_MAX_QUEUE = 100_000
_BATCH = 512


class _Event(msgspec.Struct, array_like=True):
    origin: str
    replica: str
    at: float
    op: str
    request_id: str = ""
    request_ids: list[str] = []
    groups: list[tuple[Any, list[int]]] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Event)


def _hashable(key: Any) -> Hashable:
    """Keys travel as msgpack: bytes stay bytes, tuples come back as lists (made tuples again)."""
    if isinstance(key, list):
        return tuple(_hashable(part) for part in key)
    return key  # type: ignore[no-any-return]


class Replication:
    """Publishes this gateway's index changes and applies the other gateways' (see the module docstring)."""

    def __init__(self, url: str, replicas: ReplicaSet, metrics: Metrics, *, max_len: int, stream: str = STREAM):
        self.redis = redis.Redis.from_url(url)
        self.replicas = replicas
        self.metrics = metrics
        self.max_len = max_len
        self.stream = stream
        self.origin = uuid.uuid4().hex
        self.last_id = b"0-0"  # from the start: a late gateway catches up with what the stream retains
        self._queue: deque[bytes] = deque()
        self._wake: anyio.Event | None = None  # made on the event loop, in run()
        self._by_url = {replica.url: replica for replica in replicas.replicas}
        for replica in replicas.replicas:
            replica.residency.on_change = self._publisher(replica)

    def _publisher(self, replica: Replica) -> Any:
        def publish(change: Change) -> None:
            op = change[0]
            event = _Event(self.origin, replica.url, time.time(), op)
            if op == "commit":
                event.request_id = change[1]
                event.groups = [(key, list(blocks)) for key, blocks in change[2]]
            elif op == "evict":
                event.request_ids = list(change[1])
            if len(self._queue) >= _MAX_QUEUE:
                self._queue.popleft()
                self.metrics.state_dropped.inc()
            self._queue.append(_encoder.encode(event))
            if self._wake is not None:
                self._wake.set()

        return publish

    async def run(self) -> None:
        """Publish and follow until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._publish_loop)
            tg.start_soon(self._follow_loop)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def flush(self) -> None:
        """Send what is queued now (tests and shutdown)."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for payload in batch:
                        pipe.xadd(self.stream, {"e": payload}, maxlen=self.max_len, approximate=True)
                    await pipe.execute()
            except (RedisError, OSError):
                self._queue.extendleft(reversed(batch))  # keep order; retried after a pause
                raise
            self.metrics.state_published.inc(len(batch))

    async def _publish_loop(self) -> None:
        while True:
            self._wake = anyio.Event()
            if not self._queue:
                await self._wake.wait()
            try:
                await self.flush()
            except (RedisError, OSError) as exc:
                self.metrics.state_errors.labels("publish").inc()
                logger.warning("cannot publish index changes to Redis: %s", exc)
                await anyio.sleep(1.0)

    async def _follow_loop(self) -> None:
        last_length = 0.0
        while True:
            try:
                answer: Any = await self.redis.xread({self.stream: self.last_id}, count=_BATCH, block=1000)
                for _, entries in answer or ():
                    for entry_id, fields in entries:
                        self.last_id = entry_id
                        self._apply(fields.get(b"e", b""))
                if time.monotonic() - last_length > 1.0:
                    last_length = time.monotonic()
                    self.metrics.state_stream_length.set(await self.redis.xlen(self.stream))
            except (RedisError, OSError) as exc:
                self.metrics.state_errors.labels("follow").inc()
                logger.warning("cannot read index changes from Redis: %s", exc)
                await anyio.sleep(1.0)

    def _apply(self, payload: bytes) -> None:
        try:
            event = _decoder.decode(payload)
        except msgspec.DecodeError:
            self.metrics.state_errors.labels("decode").inc()
            return
        if event.origin == self.origin:
            return
        replica = self._by_url.get(event.replica)
        if replica is None:
            return
        residency = replica.residency
        hook, residency.on_change = residency.on_change, None  # applied here, not published again
        try:
            if event.op == "commit":
                residency.commit(event.request_id, [(_hashable(key), blocks) for key, blocks in event.groups])
            elif event.op == "evict":
                residency.evict(event.request_ids)
            elif event.op == "reset":
                residency.reset()
        finally:
            residency.on_change = hook
        self.metrics.state_applied.inc()
        self.metrics.state_lag.observe(max(0.0, time.time() - event.at))
