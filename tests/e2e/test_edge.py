"""Hostile clients against a real ``prefixgate serve`` process: the HTTP edge, tenants, and the cost budget.

The gateway runs as users run it (``python -m gateway.cli serve``, uvicorn with the edge protocol) with two
client keys and an admin token, in front of a recording upstream (uvicorn in a thread) that keeps every request
it receives. Requests are written byte by byte on raw sockets where an HTTP library would refuse to send them
(trailers, oversized or endless headers, bodies that never finish).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.e2e.servers import CHAT_ANSWER, free_port, receive_body, serve_in_thread, wait_healthy

pytestmark = pytest.mark.timeout(120)

ALICE = {"authorization": "Bearer alice-key"}
BOB = {"authorization": "Bearer bob-key"}
ADMIN = {"authorization": "Bearer admin-token"}
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()


@dataclass
class Recorder:
    """An upstream that answers every request with one chat completion and keeps what it was sent."""

    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await receive_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] != "/health":
            self.seen.append((headers, body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": CHAT_ANSWER})


@dataclass
class Gateway:
    url: str
    port: int
    upstream: Recorder


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    recorder = Recorder()
    with serve_in_thread(recorder) as upstream_url:
        port = free_port()
        command = [
            sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--upstream", upstream_url,
            "--api-key", "alice-key", "--api-key", "bob-key", "--admin-token", "admin-token",
            "--http-header-timeout", "1", "--http-body-timeout", "1", "--http-max-headers", "50",
            "--http-max-header-bytes", "8192", "--http-max-requests-per-connection", "3",
            "--intercept-budget-ms", "5", "--log-level", "error",
        ]  # fmt: skip
        process = subprocess.Popen(command)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health")
            yield Gateway(f"http://127.0.0.1:{port}", port, recorder)
        finally:
            process.terminate()
            process.wait(timeout=30)


def exchange(port: int, raw: bytes, *, wait: float = 5.0) -> bytes:
    """Write ``raw`` on a fresh connection and read until the server closes it (or ``wait`` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(raw)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def chunked_with_trailer(headers: bytes, trailer: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + headers
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(CHAT):x}\r\n".encode()
        + CHAT
        + b"\r\n0\r\n"
        + trailer
        + b"\r\n"
    )


# ----------------------------------------------------------------------------------------------- trailers


def test_a_trailer_never_authenticates(gateway: Gateway) -> None:
    raw = exchange(
        gateway.port,
        chunked_with_trailer(b"Authorization: Bearer WRONG\r\n", b"Authorization: Bearer alice-key\r\n"),
    )
    assert status_of(raw) == 401


def test_trailer_fields_are_neither_used_nor_forwarded(gateway: Gateway) -> None:
    before = len(gateway.upstream.seen)
    raw = exchange(
        gateway.port,
        chunked_with_trailer(b"Authorization: Bearer alice-key\r\n", b"X-Request-Id: smuggled\r\nX-Smuggled: yes\r\n"),
    )
    assert status_of(raw) == 200
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert b"smuggled" not in head
    headers, _ = gateway.upstream.seen[before]
    assert "x-smuggled" not in headers
    assert "smuggled" not in headers.get("x-request-id", "")


# ------------------------------------------------------------------------------------------- header limits


def test_oversized_headers_are_431_and_never_forwarded(gateway: Gateway) -> None:
    before = len(gateway.upstream.seen)
    big = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    assert status_of(exchange(gateway.port, big)) == 431
    many = b"GET /health HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-F%d: 1\r\n" % i for i in range(60)) + b"\r\n"
    answer = exchange(gateway.port, many)
    assert status_of(answer) == 431
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_headers"
    assert len(gateway.upstream.seen) == before


def test_a_header_flood_is_cut_off_before_it_is_buffered(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Flood: ")
        sent = 0
        try:
            while sent < 8 << 20:  # a 64 MB header in the issue; the server must hang up long before 8 MB
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass
        answer = read_all(sock)
    assert sent < 8 << 20 or status_of(answer) == 431


# ---------------------------------------------------------------------------------------------- slow clients


def test_slow_headers_get_408_and_a_closed_connection(gateway: Gateway) -> None:
    started = time.monotonic()
    raw = exchange(gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n", wait=10)
    assert status_of(raw) == 408
    assert time.monotonic() - started < 9  # closed by the gateway, not by the test's own timeout


def test_a_silent_connection_is_closed(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        started = time.monotonic()
        read_all(sock)
        assert time.monotonic() - started < 9


def test_a_body_that_never_finishes_is_dropped(gateway: Gateway) -> None:
    before = len(gateway.upstream.seen)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer alice-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    started = time.monotonic()
    exchange(gateway.port, head, wait=10)
    assert time.monotonic() - started < 9
    assert len(gateway.upstream.seen) == before
    assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200


def test_keep_alive_connections_serve_a_bounded_number_of_requests(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=5) as client:
        answers = [client.get("/health") for _ in range(3)]
    assert [a.headers.get("connection") for a in answers[:2]] == [None, None]
    assert answers[2].headers.get("connection") == "close"


# ------------------------------------------------------------------------------------------ forwarded fields


def test_fields_named_in_connection_are_dropped(gateway: Gateway) -> None:
    before = len(gateway.upstream.seen)
    answer = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=CHAT,
        headers={**ALICE, "connection": "keep-alive, X-Hop", "x-hop": "internal", "x-kept": "yes"},
        timeout=10,
    )
    assert answer.status_code == 200
    headers, _ = gateway.upstream.seen[before]
    assert "x-hop" not in headers
    assert headers["x-kept"] == "yes"


# ------------------------------------------------------------------------------------------------- tenants


def test_index_routes_refuse_unauthenticated_callers(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/requests", timeout=5).status_code == 401
    huge = json.dumps({"contexts": [[i] for i in range(200_000)]})
    assert httpx.post(f"{gateway.url}/schedule", content=huge, timeout=30).status_code == 401
    listed = httpx.get(f"{gateway.url}/requests", headers=ALICE, timeout=5)
    assert listed.status_code == 200


def test_ids_issued_to_one_key_are_not_honoured_for_another(gateway: Gateway) -> None:
    issued = httpx.post(f"{gateway.url}/schedule", json={"contexts": [[1, 2]]}, headers=ALICE, timeout=5)
    rid = issued.json()["request_ids"][0]
    own = httpx.post(f"{gateway.url}/v1/chat/completions", content=CHAT, headers={**ALICE, "x-request-id": rid})
    other = httpx.post(f"{gateway.url}/v1/chat/completions", content=CHAT, headers={**BOB, "x-request-id": rid})
    assert own.headers["x-request-id"] == rid
    assert other.headers["x-request-id"] != rid


# --------------------------------------------------------------------------------------------- cost budget


def test_a_hostile_prompt_is_forwarded_unchanged_and_the_gateway_keeps_answering(gateway: Gateway) -> None:
    head = "".join(f"Doc{' ' * s}1: some text here\nDoc{' ' * s}2: more text here\n" for s in range(1, 1001))
    text = head + "ordinary words in a line of prose\n" * 60_000
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    before = len(gateway.upstream.seen)
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, headers=ALICE, timeout=60)
    assert answer.status_code == 200
    assert json.loads(answer.headers["x-prefixgate-result"])["skipped"] == "budget"
    _, forwarded = gateway.upstream.seen[before]
    assert json.loads(forwarded)["messages"][0]["content"] == text
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    assert 'prefixgate_intercept_skipped_total{reason="budget"}' in metrics


# --------------------------------------------------------------------------------------------- label rules


def test_identifiers_and_unpaired_tags_survive_the_real_proxy(gateway: Gateway) -> None:
    docs = [f"Clause text {n}: " + " ".join(f"w{n}x{j}" for j in range(12)) for n in range(3)]

    def articles(order: list[int]) -> str:
        numbered = "".join(f"Article {12 + n}: {docs[k]}\n" for n, k in enumerate(order))
        return f"Context:\n{numbered}\nWhich article?"

    docbook = (
        "<documents><document>In DocBook, the <document> element wraps a whole book.</document>\n"
        f"<document>{docs[0]}</document></documents>\nWhich element?"
    )
    # the first prompt caches its clauses in another order: a renumbering proxy then moves clause texts under
    # other article numbers to match it
    for text in (articles([2, 0, 1]), articles([0, 1, 2]), docbook):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
        before = len(gateway.upstream.seen)
        answer = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, headers=BOB, timeout=30)
        assert answer.status_code == 200
        sent = json.loads(gateway.upstream.seen[before][1])["messages"][0]["content"]
        if text is docbook:
            assert sent == text
        else:  # the articles may move, each with its own number (the label stays attached)
            assert sorted(sent.splitlines()) == sorted(text.splitlines())
