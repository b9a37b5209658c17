"""Passthrough paths must stay inside the upstream's /v1 tree, whatever the client's HTTP library does."""

from __future__ import annotations

import pytest

from gateway.edge.inbound import check_passthrough_path
from gateway.errors import NotFound


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
