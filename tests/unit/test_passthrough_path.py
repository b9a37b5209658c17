"""One spelling per route (normalise_path); passthrough paths stay inside the upstream's /v1 tree whatever the client's
HTTP library does."""

from __future__ import annotations

import pytest

from gateway.edge.inbound import check_passthrough_path, normalise_path
from gateway.errors import InvalidRequest, NotFound


@pytest.mark.parametrize(
    "path",
    [b"/v1/models", b"/v1/files/f-1/content", b"/v1/fine_tuning/jobs", b"/v1/a:b@c", b"/v1/x%20y"],
)
def test_ordinary_paths_pass(path: bytes) -> None:
    check_passthrough_path(path)


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../admin",
        b"/v1/a/./b",
        b"/v1/a/..",
        b"/v1/.",
        b"/v1/x/%2e%2e/y",
        b"/v1/x/%2E./y",
        b"/v1/a%2fb",
        b"/v1/a%2Fb",
        b"/v1//evil",
        b"/v1/x%5cy",
        b"/v1/x\\y",
        b"/v2/models",
        b"http://evil/v1/models",
        b"/v1/a\r\nb",
        b"/v1/a%00b",
    ],
)
def test_escaping_paths_are_refused(path: bytes) -> None:
    with pytest.raises(NotFound):
        check_passthrough_path(path)


# ------------------------------------------------------------------------------------------ normalise_path


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/v1/chat/completions", b"/v1/chat/completions"),
        (b"/v1/%63hat/completions", b"/v1/chat/completions"),
        (b"/v1/chat/%63ompletions", b"/v1/chat/completions"),
        (b"/%76%31/chat/completions", b"/v1/chat/completions"),
        (b"/v1//chat/completions", b"/v1/chat/completions"),
        (b"/v1/./chat/completions", b"/v1/chat/completions"),
        (b"/v1/x/../chat/completions", b"/v1/chat/completions"),
        (b"/v1/chat/completions/", b"/v1/chat/completions"),
        (b"/v1/chat/completions/.", b"/v1/chat/completions"),
        (b"/v1/messages//", b"/v1/messages"),
        (b"//reorder", b"/reorder"),
        (b"/v1/files/a%2ejson", b"/v1/files/a.json"),
        (b"/v1/x%20y", b"/v1/x%20y"),
        (b"/v1/x%3a%7e", b"/v1/x%3A~"),
        (b"/v1/.well-known", b"/v1/.well-known"),
        (b"/v1/..a/b", b"/v1/..a/b"),
        (b"/", b"/"),
        (b"/v1/..", b"/"),
    ],
)
def test_every_spelling_of_a_route_normalises_to_one(raw: bytes, normal: bytes) -> None:
    assert normalise_path(raw) == normal
    assert normalise_path(normal) == normal  # idempotent


def test_a_normal_path_is_returned_without_a_copy() -> None:
    path = b"/v1/chat/completions"
    assert normalise_path(path) is path


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/a%2fb",
        b"/v1/a%2Fb",
        b"/v1/a%5cb",
        b"/v1/a%00b",
        b"/v1/a%0ab",
        b"/v1/a%7fb",
        b"/v1/%2e%2e/admin",
        b"/v1/%2E./x",
        b"/v1/.%2e/x",
        b"/v1/%2e/chat/completions",
        b"/v1/a%zzb",
        b"/v1/a%4",
        b"/v1/../../admin",
        b"/..",
        b"v1/models",
        b"http://evil/v1/models",
    ],
)
def test_what_cannot_be_normalised_safely_is_a_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as refused:
        normalise_path(raw)
    assert refused.value.status == 400
    assert refused.value.code == "invalid_path"
