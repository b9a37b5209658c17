"""Replicas that fail without going down, behind a real ``prefixgate serve`` process (docs/reliability.md).

Each engine is a scripted OpenAI-compatible upstream on a real socket (uvicorn in a thread) that can be told to
accept completions and never answer them while its ``/health`` keeps answering, or to answer its next health probes
late. The gateway runs as users run it, in its own process, with two replicas.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
import redis

from tests.e2e.redis import redis_url  # noqa: F401
from tests.e2e.servers import CHAT_ANSWER, gateway_process, serve_in_thread, wait_for

pytestmark = pytest.mark.timeout(120)


@dataclass
class Engine:
    """An upstream whose completions may hang (accepted, never answered) and whose health probes may come late."""

    hang: bool = False
    late_probes: int = 0  # the next probes of /health answer after ``probe_delay`` seconds
    probe_delay: float = 1.0
    completions: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            if self.late_probes:
                self.late_probes -= 1
                await asyncio.sleep(self.probe_delay)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        while (await receive()).get("more_body"):
            pass
        self.completions += 1
        if self.hang:  # until the gateway gives up on the request and closes the connection
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(CHAT_ANSWER)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": CHAT_ANSWER})


@contextmanager
def two_replicas(*options: str) -> Iterator[tuple[str, Engine, Engine]]:
    """Two scripted engines (r0, r1) behind one ``prefixgate serve`` process."""
    engines = Engine(), Engine()
    with ExitStack() as stack:
        urls = [stack.enter_context(serve_in_thread(engine)) for engine in engines]
        args = ["--upstream", urls[0], "--upstream", urls[1], "--log-level", "error", *options]
        gateway = stack.enter_context(gateway_process(*args))
        yield gateway, engines[0], engines[1]


def body(docs: list[int], question: str) -> dict[str, Any]:
    inner = "\n".join(f'<document id="d{d}">{f"topic {d} fact. " * 40}</document>' for d in docs)
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": f"Answer from the documents.\n<documents>\n{inner}\n</documents>"},
            {"role": "user", "content": question},
        ],
    }


def ask(gateway: str, docs: list[int], question: str, timeout: float = 10.0) -> httpx.Response | None:
    """One RAG request; None when the client gave up waiting."""
    try:
        return httpx.post(f"{gateway}/v1/chat/completions", json=body(docs, question), timeout=timeout)
    except httpx.TimeoutException:
        return None


def replica_of(response: httpx.Response) -> str:
    name: str = json.loads(response.headers["x-prefixgate-result"])["replica"]
    return name


def replicas(gateway: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in httpx.get(f"{gateway}/health").json()["replicas"]}


def metric(gateway: str, name: str) -> float:
    text = httpx.get(f"{gateway}/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


PREFIX = [1, 2, 3, 4, 5, 6]


def warm(gateway: str) -> None:
    """r0 holds PREFIX; both replicas have answered (their answer times are each other's yardstick)."""
    first = ask(gateway, PREFIX, "the first question")
    assert first is not None and first.status_code == 200 and replica_of(first) == "r0"
    homes = {replica_of(r) for t in range(3) if (r := ask(gateway, [100 + t, 110 + t], f"other topic {t}"))}
    assert homes == {"r0", "r1"}, "misses spread over both replicas"


# ---------------------------------------------------------------------------------------- 4. outlier ejection


def test_a_replica_that_accepts_and_never_answers_is_routed_around_and_ejected() -> None:
    """The client gives up after 3 s (the gateway's read timeout is 600 s): requests stuck far beyond the peer's
    answer times count as failures, the stuck replica is routed around, and three in a row eject it. (Stuck means
    waiting over max(1 s, 4 x the peer's median answer head): under 3 s while the peer answers within 0.5 s, as
    it does on a loaded 2-core machine.) How many requests the peer takes between two that reach r0 depends on
    its load and its own cache of the documents, so requests go on until r0 is ejected, 30 at most."""
    with two_replicas("--health-interval", "0.2", "--stuck-factor", "4") as (gateway, hung, _peer):
        warm(gateway)
        hung.hang = True
        before = hung.completions
        answered = []
        for i in range(30):  # the same documents, in other orders: the cache says r0
            response = ask(gateway, PREFIX[i % 6 :] + PREFIX[: i % 6], f"question {i}", timeout=3.0)
            if response is not None:
                assert response.status_code == 200
                answered.append(replica_of(response))
            if metric(gateway, 'prefixgate_replica_ejections_total{replica="r0"}') == 1:
                break
        assert metric(gateway, 'prefixgate_replica_ejections_total{replica="r0"}') == 1, answered
        assert hung.completions - before == 3, "eject_after (3) requests reached the hung replica, no more"
        for i in range(3):  # ejected: none reaches it
            response = ask(gateway, PREFIX, f"after {i}", timeout=3.0)
            assert response is not None and response.status_code == 200
            answered.append(replica_of(response))
        assert set(answered) == {"r1"} and hung.completions - before == 3, answered
        assert metric(gateway, 'prefixgate_replica_ejected{replica="r0"}') == 1
        assert metric(gateway, 'prefixgate_replica_ejected{replica="r1"}') == 0
        state = replicas(gateway)["r0"]
        assert state["ejected"] and not state["healthy"], "ejected although its /health answers"


def test_gateway_timeouts_count_toward_ejection_and_the_last_replica_is_never_ejected() -> None:
    """With stuck detection off, the gateway's own read timeout (1 s) is the failure: three 504s eject r0. When
    r1 then hangs too, it is kept: ejecting it would leave no replica."""
    with two_replicas("--health-interval", "0.2", "--read-timeout", "1", "--stuck-factor", "0") as (gw, hung, peer):
        warm(gw)
        hung.hang = True
        statuses = []
        for i in range(8):
            response = ask(gw, PREFIX[i % 6 :] + PREFIX[: i % 6], f"question {i}")
            assert response is not None
            statuses.append(response.status_code)
        assert statuses == [504, 504, 504, 200, 200, 200, 200, 200], statuses
        assert metric(gw, 'prefixgate_replica_ejected{replica="r0"}') == 1
        peer.hang = True
        for i in range(4):
            response = ask(gw, PREFIX, f"now r1 hangs too {i}")
            assert response is not None and response.status_code == 504
        assert metric(gw, 'prefixgate_replica_ejected{replica="r1"}') == 0, "never the last replica in routing"
        assert metric(gw, 'prefixgate_replica_ejections_total{replica="r1"}') == 0


# ---------------------------------------------------------------------------------------- 5. index drops


def _ops(url: str, replica: str) -> list[str]:
    """The ops of the shared stream's entries for ``replica`` (commit, evict, reset)."""
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrange("prefixgate:index")
    finally:
        client.close()
    events = [msgspec.msgpack.decode(fields[b"e"]) for _, fields in entries]
    return [event[3] for event in events if event[1] == replica]


def test_one_late_health_probe_keeps_the_index_and_a_run_of_failures_drops_it(redis_url: str) -> None:  # noqa: F811
    """Probes time out after 0.3 s. One answered after 1 s is not evidence of a restart: the index stays, and
    nothing is published to the other gateways; three late probes in a row are, and the index goes."""
    with two_replicas("--health-interval", "0.3", "--state", redis_url) as (gateway, busy, _):
        warm(gateway)
        for i in range(4):
            response = ask(gateway, PREFIX[i:] + PREFIX[:i], f"again {i}")
            assert response is not None and replica_of(response) == "r0"
        held = replicas(gateway)["r0"]["index_requests"]
        assert held >= 3
        r0_url = replicas(gateway)["r0"]["url"]
        busy.late_probes = 1
        wait_for(lambda: busy.late_probes == 0, timeout=15)
        time.sleep(2.0)  # the late answer, then several answered rounds
        assert replicas(gateway)["r0"]["index_requests"] == held, "one late probe does not wipe the index"
        assert metric(gateway, 'prefixgate_replica_index_drops_total{replica="r0"}') == 0
        assert "reset" not in _ops(redis_url, r0_url), "and no reset is published to the other gateways"
        busy.late_probes = 3  # a run of eject_after failed probes: evidence of a restart
        wait_for(lambda: replicas(gateway)["r0"]["index_requests"] == 0, timeout=15)
        assert metric(gateway, 'prefixgate_replica_index_drops_total{replica="r0"}') == 1
        wait_for(lambda: "reset" in _ops(redis_url, r0_url), timeout=15)
