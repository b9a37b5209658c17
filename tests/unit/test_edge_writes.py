"""``gateway.edge.server``: the head of an answer with a known length goes out with its body in one write; streamed
answers, HEAD answers, empty bodies and ``100 Continue`` are written at once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway.edge.server import _HeldHead


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _cycle(**fields: Any) -> Any:
    base = {
        "response_started": True,
        "response_complete": False,
        "chunked_encoding": False,
        "expected_content_length": 5,
        "scope": {"method": "POST"},
    }
    return SimpleNamespace(**{**base, **fields})


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


def test_head_and_body_of_a_known_length_go_out_together() -> None:
    transport = _Transport()
    held = _HeldHead(transport, _cycle())
    held.write(HEAD)
    assert transport.writes == []
    held.write(b"hello")
    assert transport.writes == [HEAD + b"hello"]
    held.write(b"more")  # a later write goes straight through
    assert transport.writes[-1] == b"more"


@pytest.mark.parametrize(
    "fields",
    [
        {"chunked_encoding": True},  # a stream: its head goes out at once
        {"expected_content_length": 0},  # no body will follow
        {"scope": {"method": "HEAD"}},  # no body is ever written
        {"response_started": False},  # ``100 Continue`` before the answer
    ],
)
def test_heads_without_a_body_to_follow_are_written_at_once(fields: dict[str, Any]) -> None:
    transport = _Transport()
    _HeldHead(transport, _cycle(**fields)).write(HEAD)
    assert transport.writes == [HEAD]


def test_close_drops_a_held_head_and_closes() -> None:
    transport = _Transport()
    held = _HeldHead(transport, _cycle())
    held.write(HEAD)
    held.close()
    assert transport.closed and held.is_closing() and transport.writes == []
