"""A live subscription to one engine endpoint's KV-event stream, with gap repair through the replay socket.

One subscriber follows one publisher (one engine, or one DP rank: ranks publish on offset ports). It runs on the
gateway's loop (``zmq.asyncio``) and feeds a :class:`KVEventTracker`, whose callbacks therefore run on the event
loop, the index's single writer. The gateway awaits :meth:`KVEventSubscriber.run` under its supervisor
(``gateway/background.py``), which restarts it with backoff after an unexpected error; ``start``/``stop`` (or
``async with``) run it as a task of its own, which logs such an error and ends.

Sequence handling (``seq`` counts from 0 in each publisher process):

* ``last + 1``: apply. The first message seen is applied whatever its seq (nothing before it is ours).
* ``seq > last + 1``, a gap (PUB dropped messages above its high-water mark): ask the replay socket for
  everything from ``last`` on. The replayed batch ``last`` must be byte-identical to the one applied, which
  proves that the publisher is still the same process; the missing batches are then applied in order and live
  messages already covered by the replay are skipped as duplicates.
* ``seq <= last`` (other than those duplicates), or a batch ``last`` that replays differently: the publisher
  restarted, so its cache is empty: ``reset()``, then replay from 0 to pick up what the new process already
  published (``seq == 0`` needs no replay).
* A TCP reconnection (seen on a socket monitor) is checked the same way even when seqs look contiguous, since a
  restarted engine may have published exactly ``last + 1`` batches before the subscriber came back.
* When the replay is unavailable (no endpoint, a timeout, a buffer that no longer reaches back, a short answer)
  the state is unknown: ``reset()`` and carry on from the live message.

Connect or bind: vLLM's publisher binds only for ``tcp://*:P`` and ``ipc://`` endpoints and *connects* for any
other address (``tcp://127.0.0.1:P``), so then the subscriber must bind that address itself. ``bind:`` in front
of the endpoint (``bind:tcp://127.0.0.1:5557``) or ``bind=True`` makes it bind; a restarted publisher that
connects again shows up on the monitor as a new accepted connection, checked like a reconnection. The replay
endpoint is always connected to (the engine binds its ROUTER).

ZMQ reconnects by itself when a publisher goes away and comes back. A payload that does not decode is counted
(``decode_errors``) and skipped rather than treated as a reset: a format change would otherwise reset on every
batch. Replay protocol: a DEALER sends ``[b"", start_seq]``; replies are ``[b"", topic, seq, payload]`` per
buffered batch (older publishers: ``[b"", seq, payload]``), ended by a seq of -1 with an empty payload.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engines.kvevents.tracker import KVEventCounters, KVEventTracker
from engines.kvevents.wire import KVEventDecodeError, decode_batch, decode_seq, encode_seq

__all__ = ["BIND_PREFIX", "KVEventSubscriber", "split_endpoint"]

logger = logging.getLogger(__name__)

_YIELD_EVERY = 256  # replayed batches applied between yields to the loop
BIND_PREFIX = "bind:"


def split_endpoint(endpoint: str) -> tuple[str, bool]:
    """``(address, bind)`` of an endpoint setting: ``bind:tcp://127.0.0.1:5557`` binds, anything else connects."""
    if endpoint.startswith(BIND_PREFIX):
        return endpoint.removeprefix(BIND_PREFIX), True
    return endpoint, False


class KVEventSubscriber:
    """Follows ``endpoint`` (``tcp://host:port``, ``bind:`` in front to bind it) and applies its batches to ``tracker``.

    ``bind`` overrides the prefix: ``True`` binds the address, ``False`` connects to it.
    """

    def __init__(
        self,
        endpoint: str,
        tracker: KVEventTracker,
        *,
        topic: str = "",
        replay_endpoint: str | None = None,
        replay_timeout: float = 2.0,
        hwm: int = 100_000,
        context: Any = None,
        bind: bool | None = None,
    ) -> None:
        address, prefixed = split_endpoint(endpoint)
        self.endpoint = address
        self.bind = prefixed if bind is None else bind
        self.tracker = tracker
        self.topic = topic.encode()
        self.replay_endpoint = replay_endpoint
        self.replay_timeout = replay_timeout
        self.hwm = hwm
        self._context: Any = context
        self._owns_context = context is None
        self._sub: Any = None
        self._monitor: Any = None
        self._task: asyncio.Task[None] | None = None
        self._last_seq: int | None = None
        self._last_payload = b""
        self._dup_floor: int | None = None  # live seqs in [dup_floor, last] were already applied from a replay
        self._disconnected = False
        self._reconnected = False

    @property
    def counters(self) -> KVEventCounters:
        return self.tracker.counters

    @property
    def last_seq(self) -> int | None:
        return self._last_seq

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Connect and start following in a task of its own; call from a running event loop."""
        if self._task is not None:
            raise RuntimeError("KVEventSubscriber already started")
        loop = asyncio.get_running_loop()
        self._open()
        self._task = loop.create_task(self._run_started(), name=f"kv-events {self.endpoint}")

    async def run(self) -> None:
        """Connect and follow until cancelled; an error closes the sockets and propagates (the caller restarts).

        What was learned survives a restart: the first batch after it is checked against the replay buffer, as
        after a reconnection, so that nothing published in between goes unnoticed.
        """
        if self._task is not None or self._sub is not None:
            raise RuntimeError("KVEventSubscriber already running")
        self._open()
        try:
            await self._follow()
        finally:
            self._close()
            self._reconnected = self._last_seq is not None

    def _open(self) -> None:
        if self._context is None:
            self._context = zmq.asyncio.Context()
        try:
            self._sub = self._context.socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.RCVHWM, self.hwm)
            self._sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            if self.bind:  # the publisher connects to us: its (re)connections arrive as accepted ones
                self._monitor = self._sub.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
                self._sub.bind(self.endpoint)
            else:
                self._monitor = self._sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
                self._sub.connect(self.endpoint)
        except BaseException:
            self._close()
            raise

    async def stop(self) -> None:
        """Stop following and close the sockets (and the context, when the subscriber made it); idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._close()

    def _close(self) -> None:
        if self._monitor is not None:
            self._sub.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if self._owns_context and self._context is not None:
            self._context.term()
            self._context = None

    async def __aenter__(self) -> KVEventSubscriber:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _run_started(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("KV-event subscriber for %s stopped", self.endpoint)

    async def _follow(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            if self._monitor in ready:  # before data: a reconnection precedes the new connection's messages
                await self._drain_monitor()
            if self._sub in ready:
                await self._on_frames(await self._sub.recv_multipart())

    async def _drain_monitor(self) -> None:
        while True:
            try:
                frames = await self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._disconnected = True
            elif event in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED) and self._disconnected:
                self._disconnected = False
                self._reconnected = True
                self.counters.reconnects += 1

    async def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self._decode_error("a message of %d frames", len(frames))
            return
        topic, seq_frame, payload = frames
        if topic != self.topic:  # SUBSCRIBE matches prefixes; the topic is exact
            return
        try:
            seq = decode_seq(seq_frame)
        except KVEventDecodeError as exc:
            self._decode_error("%s", exc)
            return
        await self._on_batch(seq, payload)

    async def _on_batch(self, seq: int, payload: bytes) -> None:
        last = self._last_seq
        reconnected, self._reconnected = self._reconnected, False
        if last is None or (seq == last + 1 and not reconnected):
            self._dup_floor = None
            self._apply(seq, payload)
        elif seq > last:
            if seq > last + 1:
                self.counters.gaps += 1
            await self._recover(last, seq, payload)
        elif not reconnected and self._dup_floor is not None and seq >= self._dup_floor:
            self.counters.duplicates += 1
        else:
            await self._restarted(seq, payload)

    async def _recover(self, last: int, seq: int, payload: bytes) -> None:
        """Fill ``(last, seq)`` from the replay buffer once it proves the publisher is the one followed."""
        replayed = await self._fetch_replay(last)
        if replayed and replayed[0] == (last, self._last_payload):
            if await self._fill(replayed, last + 1, seq, payload):
                self.counters.replays += 1
                return
        elif replayed and replayed[0][0] == last:
            await self._restarted(seq, payload)
            return
        elif replayed is None and seq == last + 1:
            self._apply(seq, payload)  # a reconnection, nothing to check it against: assume the same publisher
            return
        if self.replay_endpoint is not None:
            self.counters.replay_failures += 1
        logger.warning("KV events from %s between seqs %d and %d are unknown: state reset", self.endpoint, last, seq)
        self._reset_tracker()
        self._dup_floor = None
        self._apply(seq, payload)

    async def _restarted(self, seq: int, payload: bytes) -> None:
        self.counters.restarts += 1
        logger.info("KV-event publisher %s restarted (seq %d after %s)", self.endpoint, seq, self._last_seq)
        self._reset_tracker()
        self._last_seq, self._last_payload, self._dup_floor = -1, b"", None
        if seq == 0:
            self._apply(seq, payload)
            return
        replayed = await self._fetch_replay(0)
        if replayed is not None and await self._fill(replayed, 0, seq, payload):
            self.counters.replays += 1
            return
        if self.replay_endpoint is not None:
            self.counters.replay_failures += 1
        self._apply(seq, payload)

    async def _fill(self, replayed: list[tuple[int, bytes]], expected: int, seq: int, payload: bytes) -> bool:
        """Apply the replayed ``expected..`` run if it reaches ``seq``; live seqs it covers become duplicates."""
        run: list[tuple[int, bytes]] = []
        for item in replayed:
            if item[0] >= expected:
                if item[0] != expected + len(run):
                    break
                run.append(item)
        end = run[-1][0] if run else expected - 1
        if end < seq - 1:
            return False
        for done, (replayed_seq, replayed_payload) in enumerate(run, start=1):
            self._apply(replayed_seq, replayed_payload)
            if done % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if seq > end:
            self._apply(seq, payload)
        else:
            self._dup_floor = seq
        return True

    async def _fetch_replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """Every buffered ``(seq, payload)`` from ``start`` on; ``None`` when there is no usable answer."""
        if self.replay_endpoint is None:
            return None
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        batches: list[tuple[int, bytes]] = []
        try:
            dealer.connect(self.replay_endpoint)
            async with asyncio.timeout(self.replay_timeout):
                await dealer.send_multipart([b"", encode_seq(start)])
            while True:
                async with asyncio.timeout(self.replay_timeout):
                    frames: list[bytes] = await dealer.recv_multipart()
                if frames[:1] == [b""]:
                    frames = frames[1:]  # the envelope delimiter the ROUTER echoes back
                if len(frames) not in (2, 3):
                    raise KVEventDecodeError(f"a replay message of {len(frames)} frames")
                seq = decode_seq(frames[-2])
                if seq == -1:  # END_SEQ
                    return batches
                batches.append((seq, frames[-1]))
        except (TimeoutError, KVEventDecodeError, zmq.ZMQError) as exc:
            logger.warning("KV-event replay from %s failed: %r", self.replay_endpoint, exc)
            return None
        finally:
            dealer.close(linger=0)

    def _apply(self, seq: int, payload: bytes) -> None:
        self._last_seq, self._last_payload = seq, payload
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as exc:
            self._decode_error("seq %d: %s", seq, exc)
            return
        try:
            self.tracker.apply(batch)
        except Exception:
            logger.exception("KV-event callback failed (%s, seq %d)", self.endpoint, seq)

    def _reset_tracker(self) -> None:
        try:
            self.tracker.reset()
        except Exception:
            logger.exception("KV-event reset callback failed (%s)", self.endpoint)

    def _decode_error(self, message: str, *args: object) -> None:
        self.counters.decode_errors += 1
        count = self.counters.decode_errors
        if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th...: visible without flooding the log
            logger.warning("undecodable KV event from %s (%d so far): " + message, self.endpoint, count, *args)
