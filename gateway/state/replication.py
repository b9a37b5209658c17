"""Several gateways, one view: index changes replicated through a Redis Stream (``--state redis://...``).

Each gateway keeps planning on its own in-memory index and appends every change it makes — a request committed
to a replica, requests evicted from it, a replica's index reset — to one Redis Stream (``XADD ... MAXLEN ~ N``,
so the stream stays bounded). Every gateway follows the stream (``XREAD BLOCK`` from the last id it applied) and
applies the other gateways' changes to its own index, so an eviction reported to gateway A releases the entry
in B, and a request planned in B sees what A sent. A gateway that starts (or restarts) late reads the stream from
its beginning and so catches up with what is still retained. Redis orders the changes; there is no consensus of
our own. Replicas are named in the stream by URL, so gateways must front the same replicas (any order).

Nothing here is on the request path, and the Redis round trips are off the event loop: a change is put on a
bounded in-memory queue (oldest dropped and counted when Redis is away) and a publisher *thread* sends what is
queued in one pipeline; a follower thread blocks in ``XREAD``, decodes what it reads, and hands the changes to the
event loop, which applies them (the live index has a single writer). Under load the loop is busy planning
requests: a change then waits for one loop turn (to be applied) instead of several (to be sent, read and parsed by
tasks on the loop). Lag (from the producing gateway's clock to applying here) and the stream length are exported
as metrics.

Entries are not trusted: anything that can write to the Redis server can write to the stream. An entry is decoded
into a typed, size-bounded ``_Event`` (keys are bytes or short lists of strings, blocks ints, at most
``max_blocks`` blocks and ``_MAX_IDS`` ids) and checked before it is applied; an entry that fails is skipped and
counted (``prefixgate_state_errors_total{kind="invalid"}``, or ``"decode"`` for bytes that are not an event)
without losing its neighbours. The loop applies a batch in slices of at most ``_SLICE`` seconds (a slice ends
before an event whose estimated cost would take it past that), yielding between them, so a big batch never holds
the proxy's requests up.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Hashable
from functools import partial
from typing import Annotated, Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import msgspec
import redis
from redis.exceptions import RedisError

from gateway.metrics import Metrics
from gateway.planning.residency import Change
from gateway.upstream.replicas import Replica, ReplicaSet

__all__ = ["Replication"]

logger = logging.getLogger("prefixgate.replication")

STREAM = "prefixgate:index"
_MAX_QUEUE = 100_000
_BATCH = 512
_WAIT = 0.25  # XREAD BLOCK and the publisher's idle wait, in seconds: how soon a stopped thread notices
_SOCKET_TIMEOUT = 5.0  # longer than the XREAD block
_MAX_ENTRY_BYTES = 8 << 20  # an entry above this is not decoded at all
_MAX_IDS = 4_096  # request ids per evict event (the publisher splits bigger evictions)
_MAX_GROUPS = 4_096  # block groups per commit (a group holds one block at least)
_MAX_GROUP_BLOCKS = 65_536  # decode-time bound per group; the total is checked against ``max_blocks``
_SLICE = 0.005  # seconds the loop may spend applying before it yields
_COST_PER_ITEM = 1e-6  # seconds to apply one block or id (a 4,096-block commit: ~3.5 ms)

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Key = (
    Annotated[bytes, msgspec.Meta(max_length=64)]
    | Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=4)]
)  # the proxy's prefix digests, and the index API's ("index-api", owner)
_Group = tuple[_Key, Annotated[list[int], msgspec.Meta(max_length=_MAX_GROUP_BLOCKS)]]


class _Event(msgspec.Struct, array_like=True):
    origin: Annotated[str, msgspec.Meta(max_length=64)]
    replica: Annotated[str, msgspec.Meta(max_length=2048)]
    at: float
    op: Literal["commit", "evict", "reset"]
    request_id: Annotated[str, msgspec.Meta(max_length=256)] = ""
    request_ids: Annotated[list[_Id], msgspec.Meta(max_length=_MAX_IDS)] = []
    groups: Annotated[list[_Group], msgspec.Meta(max_length=_MAX_GROUPS)] = []

    def size(self) -> int:
        """Blocks and ids the event carries (what applying it costs)."""
        return sum(len(blocks) for _, blocks in self.groups) + len(self.request_ids)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Event)


def _hashable(key: Any) -> Hashable:
    """Keys travel as msgpack: bytes stay bytes, tuples come back as lists (made tuples again)."""
    if isinstance(key, list):
        return tuple(_hashable(part) for part in key)
    return key  # type: ignore[no-any-return]


class Replication:
    """Publishes this gateway's index changes and applies the other gateways' (see the module docstring)."""

    def __init__(
        self,
        url: str,
        replicas: ReplicaSet,
        metrics: Metrics,
        *,
        max_len: int,
        stream: str = STREAM,
        max_blocks: int = _MAX_GROUP_BLOCKS,
    ):
        # blocking client, used by the two threads only (a pool: one connection each)
        self.redis = redis.Redis.from_url(url, socket_timeout=_SOCKET_TIMEOUT, socket_connect_timeout=2.0)
        self.replicas = replicas
        self.metrics = metrics
        self.max_len = max_len
        self.stream = stream
        self.max_blocks = max_blocks  # blocks one event may carry: what one request may (``max_blocks_per_request``)
        self.origin = uuid.uuid4().hex
        self.last_id = b"0-0"  # from the start: a late gateway catches up with what the stream retains
        self._queue: deque[bytes] = deque()
        self._queued = threading.Event()  # set after an append: wakes the publisher thread
        self._stop = threading.Event()
        self._send_lock = threading.Lock()  # one sender at a time keeps the stream in the order of the changes
        self._threads = anyio.CapacityLimiter(2)  # not the default limiter the proxy plans big bodies with
        self._by_url = {replica.url: replica for replica in replicas.replicas}
        for replica in replicas.replicas:
            replica.residency.on_change = self._publisher(replica)

    def _publisher(self, replica: Replica) -> Any:
        def publish(change: Change) -> None:
            op = change[0]
            if op == "evict":  # in events of at most ``_MAX_IDS`` ids, as followers accept them
                ids = list(change[1])
                for start in range(0, len(ids), _MAX_IDS):
                    self._enqueue(
                        _Event(self.origin, replica.url, time.time(), op, request_ids=ids[start : start + _MAX_IDS])
                    )
                return
            event = _Event(self.origin, replica.url, time.time(), op)
            if op == "commit":
                event.request_id = change[1]
                event.groups = [(key, list(blocks)) for key, blocks in change[2]]
            self._enqueue(event)

        return publish

    def _enqueue(self, event: _Event) -> None:
        if len(self._queue) >= _MAX_QUEUE:
            self._queue.popleft()
            self.metrics.state_dropped.inc()
        self._queue.append(_encoder.encode(event))
        self._queued.set()

    async def run(self) -> None:
        """Publish and follow (in two threads) until cancelled."""
        stop = self._stop = threading.Event()  # this run's: a thread abandoned by an earlier run keeps its own, set
        try:
            async with anyio.create_task_group() as tg:
                for work in (self._publish_loop, self._follow_loop):
                    run = partial(anyio.to_thread.run_sync, work, stop, abandon_on_cancel=True, limiter=self._threads)
                    tg.start_soon(run)
        finally:
            stop.set()  # an abandoned thread ends within one XREAD block or queue wait
            self._queued.set()

    async def aclose(self) -> None:
        self._stop.set()
        self._queued.set()
        self.redis.close()

    async def flush(self) -> None:
        """Send what is queued now (tests and shutdown)."""
        await anyio.to_thread.run_sync(self._send_queued, limiter=self._threads)

    # -- in the threads ------------------------------------------------------------------------------------
    def _send_queued(self) -> None:
        with self._send_lock:
            while self._queue:
                batch: list[bytes] = []
                while self._queue and len(batch) < _BATCH:
                    try:
                        batch.append(self._queue.popleft())
                    except IndexError:  # the loop dropped the oldest (queue full) meanwhile
                        break
                try:
                    pipe = self.redis.pipeline(transaction=False)
                    for payload in batch:
                        pipe.xadd(self.stream, {"e": payload}, maxlen=self.max_len, approximate=True)
                    pipe.execute()
                except (RedisError, OSError):
                    self._queue.extendleft(reversed(batch))  # keep order; retried after a pause
                    raise
                self.metrics.state_published.inc(len(batch))

    def _publish_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._queued.wait(_WAIT)
            self._queued.clear()  # before sending: a change appended from now on sets it again
            try:
                self._send_queued()
            except (RedisError, OSError) as exc:
                if stop.is_set():
                    return  # closed at shutdown
                self.metrics.state_errors.labels("publish").inc()
                logger.warning("cannot publish index changes to Redis: %s", exc)
                stop.wait(1.0)

    def _follow_loop(self, stop: threading.Event) -> None:
        last_length = 0.0
        while not stop.is_set():
            try:
                answer: Any = self.redis.xread({self.stream: self.last_id}, count=_BATCH, block=int(_WAIT * 1000))
                events = []
                for _, entries in answer or ():
                    for entry_id, fields in entries:
                        self.last_id = entry_id
                        event = self._decode(fields.get(b"e", b""))
                        if event is not None:
                            events.append(event)
                if events and not stop.is_set():
                    anyio.from_thread.run(self._apply_sliced, events)
                if time.monotonic() - last_length > 1.0:
                    last_length = time.monotonic()
                    self.metrics.state_stream_length.set(self.redis.xlen(self.stream))
            except (RedisError, OSError) as exc:
                if stop.is_set():
                    return  # closed at shutdown
                self.metrics.state_errors.labels("follow").inc()
                logger.warning("cannot read index changes from Redis: %s", exc)
                stop.wait(1.0)
            except anyio.RunFinishedError:
                return  # the event loop is gone (shutdown)

    def _decode(self, payload: bytes) -> _Event | None:
        """Another gateway's valid change for one of our replicas, or None (ours, unknown replica, invalid)."""
        try:
            if len(payload) > _MAX_ENTRY_BYTES:
                raise msgspec.ValidationError(f"entry of {len(payload)} bytes")
            event = _decoder.decode(payload)
            if event.op == "commit" and not event.request_id:
                raise msgspec.ValidationError("commit without a request id")
            if event.op == "commit" and event.size() > self.max_blocks:
                raise msgspec.ValidationError(f"commit of {event.size()} blocks")
        except msgspec.ValidationError as exc:  # well-formed msgpack, not a valid change
            self.metrics.state_errors.labels("invalid").inc()
            logger.warning("skipped an invalid entry of the shared stream: %s", exc)
            return None
        except msgspec.DecodeError:
            self.metrics.state_errors.labels("decode").inc()
            return None
        if event.origin == self.origin or event.replica not in self._by_url:
            return None
        return event

    # -- on the event loop ---------------------------------------------------------------------------------
    def _apply(self, payload: bytes) -> None:
        event = self._decode(payload)
        if event is not None:
            self._apply_events([event])

    def _apply_events(self, events: list[_Event]) -> None:
        for event in events:
            self._apply_one(event)

    async def _apply_sliced(self, events: list[_Event]) -> None:
        """Apply ``events`` in order, yielding to the loop before an event that would take the slice past ``_SLICE``."""
        started, applied = time.perf_counter(), 0
        for event in events:
            if applied and time.perf_counter() - started + event.size() * _COST_PER_ITEM > _SLICE:
                await anyio.lowlevel.checkpoint()
                started, applied = time.perf_counter(), 0
            self._apply_one(event)
            applied += 1

    def _apply_one(self, event: _Event) -> None:
        residency = self._by_url[event.replica].residency
        hook, residency.on_change = residency.on_change, None  # applied here, not published again
        try:
            if event.op == "commit":
                residency.commit(event.request_id, [(_hashable(key), blocks) for key, blocks in event.groups])
            elif event.op == "evict":
                residency.evict(event.request_ids)
            else:
                residency.reset()
        finally:
            residency.on_change = hook
        self.metrics.state_applied.inc()
        self.metrics.state_lag.observe(max(0.0, time.time() - event.at))
