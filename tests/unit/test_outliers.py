"""Outlier ejection and index drops on a replica set with a hand-driven clock (the rules of docs/reliability.md)."""

from __future__ import annotations

from gateway.app import create_app
from gateway.settings import load_settings
from gateway.upstream.replicas import Replica, ReplicaSet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replica_set(count: int, **settings: object) -> tuple[ReplicaSet, Clock]:
    upstreams = [f"http://r{i}.test:8000" for i in range(count)]
    replicas: ReplicaSet = create_app(load_settings(environ={}, upstream=upstreams, **settings)).state.replicas
    clock = Clock()
    replicas.clock = clock
    return replicas, clock


def fail(replicas: ReplicaSet, replica: Replica, times: int) -> None:
    for _ in range(times):
        replicas.request_failed(replicas.started(replica), "timeout")


def test_consecutive_failures_eject_for_a_time_that_grows_with_repeats_and_decays() -> None:
    replicas, clock = replica_set(2, eject_after=3, eject_time=30.0)
    r0, r1 = replicas.replicas
    fail(replicas, r0, 2)
    replicas.answered(replicas.started(r0), 200)  # an answer breaks the run
    fail(replicas, r0, 2)
    assert replicas.healthy() == [r0, r1]
    fail(replicas, r0, 1)
    assert replicas.healthy() == [r1] and r0.ejections == 1
    clock.now += 30.0
    assert replicas.healthy() == [r0, r1], "back after eject_time"
    fail(replicas, r0, 3)
    clock.now += 59.0
    assert replicas.healthy() == [r1], "the second ejection lasts twice as long"
    clock.now += 1.0
    assert replicas.healthy() == [r0, r1]
    clock.now += 10 * 30.0  # admitted long enough: the level decays back to zero
    fail(replicas, r0, 3)
    clock.now += 30.0
    assert replicas.healthy() == [r0, r1]
    # a 502/503/504 answer counts, another status resets the run
    fail(replicas, r0, 2)
    replicas.answered(replicas.started(r0), 503)
    assert replicas.healthy() == [r1]


def test_at_most_the_ejected_share_and_never_the_last_replica() -> None:
    replicas, _ = replica_set(4, eject_after=1, max_ejected_percent=50)
    r0, r1, r2, r3 = replicas.replicas
    for replica in (r0, r1, r2):
        fail(replicas, replica, 1)
    assert replicas.healthy() == [r2, r3], "half of four at most"
    replicas, _ = replica_set(2, eject_after=1)
    r0, r1 = replicas.replicas
    r1.healthy = False  # its checks fail
    fail(replicas, r0, 5)
    assert replicas.healthy() == [r0], "the last replica in routing is kept"


def test_a_request_stuck_far_beyond_the_peers_is_routed_around_and_counted_once() -> None:
    replicas, clock = replica_set(2, eject_after=2, stuck_factor=10.0)
    r0, r1 = replicas.replicas
    for _ in range(5):
        pending = replicas.started(r1)
        clock.now += 0.2  # the peer answers in 0.2 s: r0's limit is 2 s
        replicas.answered(pending, 200)
    stuck = replicas.started(r0)
    clock.now += 1.9
    replicas.scan()
    assert not r0.stuck
    clock.now += 0.2
    replicas.scan()
    replicas.scan()
    assert r0.stuck and replicas.healthy() == [r1] and r0.request_failures == 1, "counted once"
    replicas.ended(stuck)  # its client gave up
    replicas.scan()
    assert not r0.stuck and replicas.healthy() == [r0, r1]


def test_only_evidence_of_a_restart_drops_the_index() -> None:
    replicas, _ = replica_set(2, eject_after=3)
    r0 = replicas.replicas[0]
    r0.residency.commit("req-1", [(b"k", (1, 2))])
    replicas.failed(r0, "health check")  # one late probe
    replicas.succeeded(r0)
    assert "req-1" in r0.residency.index and r0.index_drops == 0
    replicas.failed(r0, "health check", restarted=True)  # nothing listened
    replicas.succeeded(r0)
    assert "req-1" not in r0.residency.index and r0.index_drops == 1
    r0.residency.commit("req-2", [(b"k", (1, 2))])
    for _ in range(3):  # a run of eject_after failed probes
        replicas.failed(r0, "health check")
    assert not r0.healthy
    replicas.succeeded(r0)
    assert "req-2" not in r0.residency.index and r0.index_drops == 2


def test_failures_of_requests_sent_before_an_ejection_do_not_carry_past_it() -> None:
    replicas, clock = replica_set(2, eject_after=2, eject_time=30.0)
    r0, r1 = replicas.replicas
    in_flight = [replicas.started(r0) for _ in range(5)]
    for pending in in_flight:  # two eject it, the other three time out while it is out
        replicas.request_failed(pending, "timeout")
    assert replicas.healthy() == [r1]
    clock.now += 30.0
    fail(replicas, r0, 1)
    assert replicas.healthy() == [r0, r1], "one new failure is not a run"
