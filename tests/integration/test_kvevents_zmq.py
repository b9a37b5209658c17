"""The KV-event subscriber against a real ZMQ publisher built like vLLM's (PUB + ROUTER replay) on loopback.

The publisher is an XPUB so that a test can wait for the subscription to arrive before publishing (a plain PUB
drops everything sent before that); to the subscriber it is indistinguishable from vLLM's PUB. A batch
published with ``drop=True`` goes into the replay buffer only, as if PUB had dropped it above its HWM.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
import pytest
import zmq
import zmq.asyncio

from engines.kvevents import END_SEQ, KVEventSubscriber, KVEventTracker
from engines.kvevents.subscriber import split_endpoint

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOPIC = b"kv-events"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def stored_map(rid: str | None, *hashes: int | bytes, **extra: Any) -> dict[str, Any]:
    event = {
        "type": "BlockStored",
        "block_hashes": list(hashes),
        "parent_block_hash": None,
        "token_ids": list(range(16 * len(hashes))),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        **extra,
    }
    if rid is not None:
        event["session_id"] = rid
    return event


def removed_array(*hashes: int | bytes) -> list[Any]:
    return ["BlockRemoved", list(hashes), "GPU"]


class Publisher:
    """vLLM's ``ZmqEventPublisher`` in miniature, including its replay service."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        legacy_replay: bool = False,
        mute_replay: bool = False,
        buffer_steps: int = 10_000,
    ) -> None:
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.LINGER, 0)
        self.port = self.replay_port = 0
        self.legacy_replay = legacy_replay
        self.mute_replay = mute_replay
        self.buffer_steps = buffer_steps
        self.buffer: list[tuple[int, bytes]] = []
        self.replay_requests: list[int] = []
        self.seq = 0
        self._server: asyncio.Task[None] | None = None

    async def bind(self, port: int | None = None, replay_port: int | None = None) -> None:
        self.port = await bind(self.pub, port)
        self.replay_port = await bind(self.replay, replay_port)
        self._server = asyncio.get_running_loop().create_task(self._serve_replay())

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    async def wait_subscribed(self) -> None:
        with anyio.fail_after(5):
            assert await self.pub.recv() == b"\x01" + TOPIC

    async def publish(self, *events: Any, drop: bool = False, topic: bytes = TOPIC, raw: bytes | None = None) -> int:
        payload = raw if raw is not None else msgspec.msgpack.encode([time.time(), list(events), 0])
        seq, self.seq = self.seq, self.seq + 1
        self.buffer = [*self.buffer, (seq, payload)][-self.buffer_steps :]
        if not drop:
            await self.pub.send_multipart([topic, seq.to_bytes(8, "big"), payload])
        return seq

    async def _serve_replay(self) -> None:
        while True:
            client, delimiter, start_frame = await self.replay.recv_multipart()
            assert delimiter == b""
            start = int.from_bytes(start_frame, "big")
            self.replay_requests.append(start)
            if self.mute_replay:
                continue
            for seq, payload in self.buffer:
                if seq >= start:
                    frames = [] if self.legacy_replay else [TOPIC]
                    await self.replay.send_multipart([client, b"", *frames, seq.to_bytes(8, "big"), payload])
            end = [END_SEQ, b""] if self.legacy_replay else [b"", END_SEQ, b""]
            await self.replay.send_multipart([client, b"", *end])

    async def close(self) -> None:
        if self._server is not None:
            self._server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server
            self._server = None
        self.pub.close(linger=0)
        self.replay.close(linger=0)


async def bind(socket: Any, port: int | None) -> int:
    """Bind to ``port`` (a free one when ``None``); a port just closed can stay busy for a moment (zmq closes
    sockets in its I/O thread)."""
    if port is None:
        return int(socket.bind_to_random_port("tcp://127.0.0.1"))
    with anyio.fail_after(5):
        while True:
            try:
                socket.bind(f"tcp://127.0.0.1:{port}")
                return port
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE:
                    raise
                await anyio.sleep(0.02)


class Recorder:
    def __init__(self) -> None:
        self.evicted: list[str] = []
        self.resets = 0

    def on_evicted(self, ids: list[str]) -> None:
        self.evicted.extend(ids)

    def on_reset(self) -> None:
        self.resets += 1


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.term()


@contextlib.asynccontextmanager
async def following(
    publisher: Publisher, *, replay: bool = True, replay_timeout: float = 2.0, **tracker_options: Any
) -> AsyncIterator[tuple[KVEventSubscriber, KVEventTracker, Recorder]]:
    recorder = Recorder()
    tracker = KVEventTracker(on_evicted=recorder.on_evicted, on_reset=recorder.on_reset, **tracker_options)
    subscriber = KVEventSubscriber(
        publisher.endpoint,
        tracker,
        topic=TOPIC.decode(),
        replay_endpoint=publisher.replay_endpoint if replay else None,
        replay_timeout=replay_timeout,
    )
    async with subscriber:
        await publisher.wait_subscribed()
        yield subscriber, tracker, recorder
    assert not subscriber.running


@contextlib.asynccontextmanager
async def publishing(
    ctx: zmq.asyncio.Context, *, port: int | None = None, replay_port: int | None = None, **options: Any
) -> AsyncIterator[Publisher]:
    publisher = Publisher(ctx, **options)
    try:
        await publisher.bind(port, replay_port)
        yield publisher
    finally:
        await publisher.close()


async def publish_r1_to_r3(publisher: Publisher, subscriber: KVEventSubscriber) -> None:
    """Publish one block for each of r1, r2 and r3 (seqs 0 to 2) and wait until the subscriber has seen them."""
    for rid in ("r1", "r2", "r3"):
        await publisher.publish(stored_map(rid, int(rid[1])))
    await until(lambda: subscriber.last_seq == 2)


@contextlib.asynccontextmanager
async def restarted(
    ctx: zmq.asyncio.Context, first: Publisher, *, once_closed: Callable[[], bool] | None = None
) -> AsyncIterator[Publisher]:
    """An engine restart: ``first`` closes and a new publisher (seqs from zero, an empty replay buffer) binds its
    ports, after ``once_closed`` holds when given."""
    port, replay_port = first.port, first.replay_port
    await first.close()
    if once_closed is not None:
        await until(once_closed)
    async with publishing(ctx, port=port, replay_port=replay_port) as second:
        yield second


async def test_follows_both_encodings_and_releases_requests(ctx: zmq.asyncio.Context) -> None:
    h1, h2 = b"\x01" * 32, b"\x02" * 32
    async with publishing(ctx) as pub, following(pub) as (sub, tracker, rec):
        await pub.publish(stored_map("r1", 1, 2, group_idx=0, kv_cache_spec_kind="full_attention", future=[1]))
        await pub.publish(
            ["BlockStored", [h1, h2], None, [1] * 32, 16, None, "GPU", {"session_id": "r2"}],
            {"type": "BlockInactive", "block_hashes": [1]},
            ["SomethingNew", 1, 2],
            stored_map("r3", 2**64 - 1),
        )
        await pub.publish(removed_array(1, h1), {"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"})
        await until(lambda: sub.last_seq == 2)
        assert rec.evicted == ["r1"]
        assert tracker.blocks_of("r2") == (h2,)
        assert tracker.is_cached("r3")
        counters = tracker.counters
        assert (counters.batches, counters.stored, counters.removed, counters.unknown) == (3, 3, 2, 2)
        assert (counters.gaps, counters.resets, rec.resets) == (0, 0, 0)


async def test_a_gap_is_filled_from_the_replay_socket(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx) as pub, following(pub) as (sub, tracker, rec):
        await pub.publish(stored_map("r1", 1, 2))
        await until(lambda: sub.last_seq == 0)
        await pub.publish(stored_map("r2", 3), drop=True)
        await pub.publish(removed_array(1, 2), drop=True)
        await pub.publish(stored_map("r3", 4))
        await pub.publish(removed_array(3))  # already buffered when the replay is served: a live duplicate
        await until(lambda: sub.last_seq == 4)
        assert pub.replay_requests == [0]  # from the last seq applied, to check it is the same publisher
        assert rec.evicted == ["r1", "r2"]
        assert tracker.is_cached("r3")
        assert rec.resets == 0
        counters = tracker.counters
        assert (counters.gaps, counters.replays, counters.replay_failures, counters.batches) == (1, 1, 0, 5)
        assert counters.duplicates == 1
        await pub.publish(removed_array(4))
        await until(lambda: sub.last_seq == 5)
        assert rec.evicted == ["r1", "r2", "r3"]


async def test_older_two_frame_replay_answers(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx, legacy_replay=True) as pub, following(pub) as (sub, tracker, rec):
        await pub.publish(stored_map("r1", 1))
        await until(lambda: sub.last_seq == 0)
        await pub.publish(removed_array(1), drop=True)
        await pub.publish(stored_map("r2", 2))
        await until(lambda: sub.last_seq == 2)
        assert rec.evicted == ["r1"]
        assert (tracker.counters.replays, rec.resets) == (1, 0)


async def test_a_gap_without_replay_endpoint_resets(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx) as pub, following(pub, replay=False) as (sub, tracker, rec):
        await pub.publish(stored_map("r1", 1))
        await until(lambda: sub.last_seq == 0)
        await pub.publish(stored_map("r2", 2), drop=True)
        await pub.publish(stored_map("r3", 3))
        await until(lambda: sub.last_seq == 2)
        assert rec.resets == 1
        assert rec.evicted == ["r1"]  # everything known is released before the reset
        assert tracker.is_cached("r3")
        assert not tracker.is_cached("r2")
        assert (tracker.counters.gaps, tracker.counters.replay_failures) == (1, 0)


async def test_a_silent_replay_socket_times_out_and_resets(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx, mute_replay=True) as pub, following(pub, replay_timeout=0.3) as (sub, tracker, rec):
        await pub.publish(stored_map("r1", 1))
        await until(lambda: sub.last_seq == 0)
        await pub.publish(stored_map("r2", 2), drop=True)
        await pub.publish(stored_map("r3", 3))
        await until(lambda: sub.last_seq == 2)
        assert pub.replay_requests == [0]
        assert (rec.resets, rec.evicted) == (1, ["r1"])
        assert tracker.counters.replay_failures == 1
        assert tracker.is_cached("r3")


async def test_a_replay_buffer_that_no_longer_reaches_back_resets(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx, buffer_steps=2) as pub, following(pub) as (sub, tracker, rec):
        await pub.publish(stored_map("r1", 1))
        await until(lambda: sub.last_seq == 0)
        for rid in ("r2", "r3", "r4"):
            await pub.publish(stored_map(rid, 2), drop=True)
        await pub.publish(stored_map("r5", 5))
        await until(lambda: sub.last_seq == 4)
        assert rec.resets == 1
        assert tracker.counters.replay_failures == 1
        assert tracker.is_cached("r5")
        assert not tracker.is_cached("r4")


async def test_all_blocks_cleared_releases_every_tracked_request(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx) as pub, following(pub) as (sub, tracker, rec):
        await pub.publish(stored_map("r1", 1), stored_map("r2", 2))
        await pub.publish({"type": "AllBlocksCleared"}, stored_map("r3", 3))
        await pub.publish(["AllBlocksCleared"])
        await until(lambda: sub.last_seq == 2)
        assert rec.evicted == ["r1", "r2", "r3"]
        assert rec.resets == 0  # the stream is whole: nothing unknown to drop
        assert tracker.counters.cleared == 2


async def test_an_engine_restart_at_seq_zero_resets(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx) as first, following(first) as (sub, tracker, rec):
        await publish_r1_to_r3(first, sub)
        async with restarted(ctx, first) as second:
            await second.wait_subscribed()  # zmq reconnected by itself
            await second.publish(stored_map("n1", 1))
            await until(lambda: tracker.is_cached("n1"))
            assert sorted(rec.evicted) == ["r1", "r2", "r3"]
            assert rec.resets == 1
            assert tracker.counters.restarts == 1
            assert sub.last_seq == 0
            await second.publish(removed_array(1))
            await until(lambda: sub.last_seq == 1)
            assert rec.evicted[-1] == "n1"


async def test_a_restart_that_lost_its_first_batches_is_replayed_from_zero(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx) as first, following(first) as (sub, tracker, rec):
        await publish_r1_to_r3(first, sub)
        async with restarted(ctx, first) as second:
            await second.publish(stored_map("n0", 10), drop=True)  # published before the subscriber came back
            await second.publish(stored_map("n1", 11), drop=True)
            await second.wait_subscribed()
            await second.publish(stored_map("n2", 12))  # seq 2 == last seq seen: not mistaken for a duplicate
            await until(lambda: tracker.is_cached("n2"))
            assert second.replay_requests == [0]
            assert sorted(rec.evicted) == ["r1", "r2", "r3"]
            assert tracker.is_cached("n0") and tracker.is_cached("n1")
            assert (tracker.counters.restarts, tracker.counters.replays, rec.resets) == (1, 1, 1)


async def test_a_restart_with_contiguous_seqs_is_caught_on_reconnection(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx) as first, following(first) as (sub, tracker, rec):
        await publish_r1_to_r3(first, sub)
        async with restarted(ctx, first, once_closed=lambda: sub._disconnected) as second:
            for rid in ("n0", "n1", "n2"):
                await second.publish(stored_map(rid, 10 + int(rid[1])), drop=True)
            await second.wait_subscribed()
            await second.publish(stored_map("n3", 13))  # seq 3 == last + 1, yet a different process
            await until(lambda: tracker.is_cached("n3"))
            assert second.replay_requests == [2, 0]  # the check (batch 2 differs), then the catch-up
            assert sorted(rec.evicted) == ["r1", "r2", "r3"]
            assert all(tracker.is_cached(rid) for rid in ("n0", "n1", "n2"))
            assert (tracker.counters.reconnects, tracker.counters.restarts, rec.resets) == (1, 1, 1)


async def test_a_reconnection_to_the_same_publisher_keeps_the_state(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx) as pub:
        recorder = Recorder()
        tracker = KVEventTracker(on_evicted=recorder.on_evicted, on_reset=recorder.on_reset)
        subscriber = KVEventSubscriber(
            pub.endpoint, tracker, topic=TOPIC.decode(), replay_endpoint=pub.replay_endpoint, context=ctx
        )
        async with subscriber:
            await pub.wait_subscribed()
            await pub.publish(stored_map("r1", 1))
            await until(lambda: subscriber.last_seq == 0)
            # The publisher's transport restarts, the process (and its seqs and replay buffer) does not.
            pub.pub.close(linger=0)
            await until(lambda: subscriber._disconnected)
            pub.pub = ctx.socket(zmq.XPUB)
            pub.pub.setsockopt(zmq.LINGER, 0)
            await bind(pub.pub, pub.port)
            await pub.publish(stored_map("r2", 2), drop=True)
            await pub.wait_subscribed()
            await pub.publish(stored_map("r3", 3))
            await until(lambda: subscriber.last_seq == 2)
            assert pub.replay_requests == [0]
            assert all(tracker.is_cached(rid) for rid in ("r1", "r2", "r3"))
            assert (tracker.counters.reconnects, tracker.counters.restarts, recorder.resets) == (1, 0, 0)
    assert not ctx.closed  # a context passed in is the caller's to terminate


async def test_undecodable_payloads_and_other_topics_are_skipped(ctx: zmq.asyncio.Context) -> None:
    async with publishing(ctx) as pub, following(pub) as (sub, tracker, rec):
        await pub.publish(raw=b"\xc1not msgpack")
        foreign = msgspec.msgpack.encode([0.0, [stored_map("x", 9)]])
        await pub.pub.send_multipart([TOPIC + b"-other", (7).to_bytes(8, "big"), foreign])  # SUBSCRIBE is a prefix
        await pub.pub.send_multipart([TOPIC, b"\x00"])  # not a three-frame message
        await pub.publish(stored_map("r1", 1))
        await until(lambda: tracker.is_cached("r1"))
        assert sub.last_seq == 1
        assert not tracker.is_cached("x")
        assert tracker.counters.decode_errors == 2
        assert (tracker.counters.gaps, tracker.counters.resets, rec.resets) == (0, 0, 0)


async def test_callback_errors_do_not_stop_the_subscriber(ctx: zmq.asyncio.Context) -> None:
    seen: list[str] = []

    def failing(ids: list[str]) -> None:
        seen.extend(ids)
        raise RuntimeError("boom")

    async with publishing(ctx) as pub:
        tracker = KVEventTracker(on_evicted=failing)
        async with KVEventSubscriber(pub.endpoint, tracker, topic=TOPIC.decode()) as subscriber:
            await pub.wait_subscribed()
            await pub.publish(stored_map("r1", 1), stored_map("r2", 2))
            await pub.publish(removed_array(1))
            await pub.publish(removed_array(2))
            await until(lambda: subscriber.last_seq == 2)
            assert seen == ["r1", "r2"]
            assert subscriber.running


async def test_one_subscriber_per_dp_rank_endpoint(ctx: zmq.asyncio.Context) -> None:
    async with (
        publishing(ctx) as rank0,
        publishing(ctx) as rank1,
        following(rank0) as (sub0, tracker0, _),
        following(rank1) as (sub1, tracker1, _),
    ):
        await rank0.publish(stored_map("a", 1))
        await rank1.publish(stored_map("b", 1))
        await rank1.publish(stored_map("c", 2))
        await until(lambda: sub0.last_seq == 0 and sub1.last_seq == 1)
        assert tracker0.requests_holding(1) == {"a"}
        assert tracker1.requests_holding(1) == {"b"}


async def test_start_stop_lifecycle() -> None:
    tracker = KVEventTracker()
    subscriber = KVEventSubscriber("tcp://127.0.0.1:1", tracker)  # nothing there: zmq keeps retrying quietly
    await subscriber.stop()  # never started: nothing to do
    subscriber.start()
    with pytest.raises(RuntimeError):
        subscriber.start()
    await anyio.sleep(0.05)
    assert subscriber.running
    await subscriber.stop()
    assert not subscriber.running
    await subscriber.stop()


async def test_a_bad_endpoint_fails_at_start_and_leaks_nothing() -> None:
    subscriber = KVEventSubscriber("tcp://*:5557", KVEventTracker())  # a bind address: connect refuses it
    with pytest.raises(zmq.ZMQError):
        subscriber.start()
    assert not subscriber.running
    await subscriber.stop()


async def test_bind_follows_a_publisher_that_connects_and_catches_its_restart(ctx: zmq.asyncio.Context) -> None:
    """vLLM connects its PUB for ``tcp://127.0.0.1:P`` (it binds only ``tcp://*`` and ``ipc://``): ``bind:`` then
    makes the subscriber the bound side; a restarted engine connecting again is checked like a reconnection."""
    port = free_tcp_port()
    recorder = Recorder()
    tracker = KVEventTracker(on_evicted=recorder.on_evicted, on_reset=recorder.on_reset)
    subscriber = KVEventSubscriber(f"bind:tcp://127.0.0.1:{port}", tracker, topic=TOPIC.decode(), context=ctx)
    assert (subscriber.endpoint, subscriber.bind) == (f"tcp://127.0.0.1:{port}", True)
    async with subscriber:

        async def engine() -> zmq.asyncio.Socket:
            pub = ctx.socket(zmq.XPUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.connect(f"tcp://127.0.0.1:{port}")  # what vLLM's ZmqEventPublisher does for this address
            with anyio.fail_after(5):
                assert await pub.recv() == b"\x01" + TOPIC
            return pub

        first = await engine()
        for seq, rid in enumerate(("r1", "r2")):
            payload = msgspec.msgpack.encode([time.time(), [stored_map(rid, seq + 1)], 0])
            await first.send_multipart([TOPIC, seq.to_bytes(8, "big"), payload])
        await until(lambda: tracker.is_cached("r2"))
        first.close(linger=0)
        await until(lambda: subscriber._disconnected)
        second = await engine()  # a new process: seqs restart at 0
        payload = msgspec.msgpack.encode([time.time(), [stored_map("n1", 7)], 0])
        await second.send_multipart([TOPIC, (0).to_bytes(8, "big"), payload])
        await until(lambda: tracker.is_cached("n1"))
        second.close(linger=0)
    assert sorted(recorder.evicted) == ["r1", "r2"]
    assert (tracker.counters.reconnects, tracker.counters.restarts, recorder.resets) == (1, 1, 1)


def test_the_endpoint_setting_says_connect_or_bind() -> None:
    assert split_endpoint("tcp://127.0.0.1:5557") == ("tcp://127.0.0.1:5557", False)
    assert split_endpoint("bind:tcp://127.0.0.1:5557") == ("tcp://127.0.0.1:5557", True)
    assert KVEventSubscriber("bind:ipc:///tmp/x", KVEventTracker(), bind=False).bind is False


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
