"""Per-replica state without a network: KV-event endpoints map to replicas, replicated changes apply to the right
replica's index (tuple keys included) and are not published again, evictions go to the replica that was sent."""

from __future__ import annotations

import msgspec
import pytest

from gateway.app import _kv_subscribers, create_app
from gateway.settings import load_settings
from gateway.state.replication import Replication, _encoder, _Event

UPSTREAMS = ["http://a.test:8000", "http://b.test:8000"]


@pytest.fixture(autouse=True)
def _zmq() -> None:
    pytest.importorskip("zmq")


def test_kv_event_endpoints_belong_to_replicas_by_position() -> None:
    settings = load_settings(environ={}, upstream=UPSTREAMS, kv_events_endpoint=["tcp://a:1", "tcp://b:2"])
    app = create_app(settings)
    trackers = [object(), object()]
    subscribers = _kv_subscribers(settings, trackers)  # type: ignore[arg-type]
    assert [(s.endpoint, s.tracker) for s in subscribers] == [("tcp://a:1", trackers[0]), ("tcp://b:2", trackers[1])]
    # one upstream: every endpoint (one per data-parallel rank) feeds its only tracker
    single = load_settings(environ={}, upstream=UPSTREAMS[:1], kv_events_endpoint=["tcp://a:1", "tcp://a:2"])
    assert {s.tracker for s in _kv_subscribers(single, trackers[:1])} == {trackers[0]}  # type: ignore[arg-type]
    assert len(app.state.replicas) == 2


def test_several_upstreams_need_one_endpoint_each() -> None:
    with pytest.raises(ValueError, match="one endpoint per --upstream"):
        load_settings(environ={}, upstream=UPSTREAMS, kv_events_endpoint=["tcp://a:1", "tcp://b:2", "tcp://c:3"])


def test_a_bind_endpoint_is_accepted_and_reaches_its_subscriber_as_bind() -> None:
    settings = load_settings(environ={}, upstream=UPSTREAMS[:1], kv_events_endpoint=["bind:tcp://127.0.0.1:5557"])
    (subscriber,) = _kv_subscribers(settings, [object()])  # type: ignore[list-item]
    assert (subscriber.endpoint, subscriber.bind) == ("tcp://127.0.0.1:5557", True)
    with pytest.raises(ValueError, match="expected tcp://host:port"):
        load_settings(environ={}, upstream=UPSTREAMS[:1], kv_events_endpoint=["bind:http://x"])
    with pytest.raises(ValueError, match="engine binds its replay socket"):
        load_settings(environ={}, kv_events_endpoint=["tcp://a:1"], kv_events_replay=["bind:tcp://127.0.0.1:5558"])


def test_changes_from_another_gateway_apply_to_the_named_replica_only() -> None:
    app = create_app(load_settings(environ={}, upstream=UPSTREAMS))
    replicas = app.state.replicas
    replication = Replication("redis://127.0.0.1:1/0", replicas, app.state.metrics, max_len=1000)
    published: list[bytes] = []
    replication._queue = published  # type: ignore[assignment]
    key = ("index-api",)
    event = _Event("other-gateway", UPSTREAMS[1], 0.0, "commit", request_id="req-1", groups=[(key, [1, 2, 3])])
    replication._apply(_encoder.encode(event))
    a, b = (r.residency for r in replicas.replicas)
    assert "req-1" in b.index and "req-1" not in a.index
    assert b.index.plan(key, [3, 2, 1]).cached == 3, "a tuple key comes back as the same tuple"
    assert published == [], "an applied change is not published again"
    replication._apply(_encoder.encode(_Event("other-gateway", UPSTREAMS[1], 0.0, "evict", request_ids=["req-1"])))
    assert "req-1" not in b.index
    replication._apply(b"not msgpack")
    own = _Event(replication.origin, UPSTREAMS[0], 0.0, "commit", request_id="req-2", groups=[(b"k", [1])])
    replication._apply(_encoder.encode(own))
    assert "req-2" not in a.index, "a gateway skips its own changes"
    # a local change is published
    a.commit("req-3", [(b"k", (4, 5))])
    assert [msgspec.msgpack.decode(p, type=_Event).request_id for p in published] == ["req-3"]


def test_evictions_release_the_replica_the_request_was_sent_to() -> None:
    app = create_app(load_settings(environ={}, upstream=UPSTREAMS))
    replicas = app.state.replicas
    a, b = replicas.replicas
    for replica in (a, b):
        replica.residency.commit("req-same", [(b"k", (1, 2))])  # a client reused its id on both replicas
    replicas.sent_to("req-same", b)
    outcome = replicas.evict(["cmpl-req-same"])
    assert outcome.evicted_request_ids == ["req-same"]
    assert "req-same" in a.residency.index and "req-same" not in b.residency.index
    assert replicas.evict(["unknown"]).not_found == ["unknown"]
