"""The operator view on a real ``prefixgate serve`` process: admin-only over real sockets, no prompt text unless
``--decision-log-text``, off when not asked for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.e2e.servers import free_port, gateway_process

pytestmark = pytest.mark.timeout(90)

DOCS = [f"Document {name}: " + " ".join(f"{name}{i}" for i in range(40)) for name in ("alpha", "beta", "gamma")]
ADMIN = {"Authorization": "Bearer adm1n-token"}


def _chat(docs: list[str]) -> dict[str, object]:
    inner = "\n".join(f'<document id="{i}">{doc}</document>' for i, doc in enumerate(docs))
    system = f"Answer from the documents.\n<documents>\n{inner}\n</documents>"
    return {"model": "sim", "max_tokens": 2, "messages": [{"role": "system", "content": system},
                                                          {"role": "user", "content": "Which?"}]}  # fmt: skip


@contextmanager
def _serve(*flags: str) -> Iterator[str]:
    flags = ("--sim-port", str(free_port()), "--log-level", "warning", "--admin-token", "adm1n-token", *flags)
    with gateway_process(*flags) as base:
        yield base


def _two_requests(client: httpx.Client) -> str:
    client.post("/v1/chat/completions", json=_chat(DOCS)).raise_for_status()
    answer = client.post("/v1/chat/completions", json=_chat(DOCS[::-1]))
    answer.raise_for_status()
    assert json.loads(answer.headers["x-prefixgate-result"])["reordered"]
    return answer.headers["x-request-id"]


def test_admin_only_and_no_text_unless_asked() -> None:
    with _serve("--decision-log", "8") as base, httpx.Client(base_url=base, timeout=30) as client:
        request_id = _two_requests(client)
        for headers in ({}, {"Authorization": "Bearer nope"}):
            refused = client.get(f"/debug/requests/{request_id}", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "admin_token_required"
        record = client.get(f"/debug/requests/{request_id}", headers=ADMIN)
        assert record.status_code == 200
        (group,) = record.json()["groups"]
        assert group["moved"] and [group["sent"][i] for i in group["order"]] == group["forwarded"]
        listed = client.get("/debug/requests", headers=ADMIN).text
        for doc in DOCS:  # neither the documents nor any word of them
            assert doc.split()[-1] not in record.text and doc.split()[-1] not in listed


def test_text_when_asked_and_nothing_when_off() -> None:
    with (
        _serve("--decision-log", "8", "--decision-log-text") as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        request_id = _two_requests(client)
        record = client.get(f"/debug/requests/{request_id}", headers=ADMIN).json()
        forwarded = json.loads(record["text"]["forwarded"]["text"])["messages"][0]["content"]
        sent = json.loads(record["text"]["sent"]["text"])["messages"][0]["content"]
        assert sent == _chat(DOCS[::-1])["messages"][0]["content"]  # type: ignore[index]
        assert forwarded != sent and sorted(forwarded) == sorted(sent)
    with _serve() as base, httpx.Client(base_url=base, timeout=30) as client:
        request_id = _two_requests(client)
        assert client.get(f"/debug/requests/{request_id}", headers=ADMIN).status_code == 404
