"""Which routes need the admin token: what the app enforces is what ``--help``, the README and the docs say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.settings import OPTIONS
from tests.integration.conftest import AppFactory

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

ROOT = Path(__file__).resolve().parents[2]
INDEX_POSTS = ("/reorder", "/build", "/schedule", "/evict", "/deduplicate", "/reset", "/search", "/insert", "/update")
INDEX_GETS = ("/stats", "/requests", "/health", "/metrics")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _routes(text: str) -> set[str]:
    return set(re.findall(r"/[a-z]+", text))


async def _refused(gateway: AppFactory, headers: dict[str, str]) -> set[str]:
    refused = set()
    async with gateway(admin_token="adm1n", api_key=["k1"]) as client:
        for path in INDEX_POSTS:
            if (await client.post(path, json={}, headers=headers)).status_code in (401, 403):
                refused.add(path)
        for path in INDEX_GETS:
            if (await client.get(path, headers=headers)).status_code in (401, 403):
                refused.add(path)
    return refused


async def test_help_readme_and_docs_name_exactly_the_guarded_routes(gateway: AppFactory) -> None:
    guarded = await _refused(gateway, {"Authorization": "Bearer k1"})  # a client key is not the admin token
    assert guarded == {"/reorder", "/build", "/evict", "/deduplicate", "/reset", "/insert", "/update"}
    # without any credential the read routes of the index are closed too (tenants must not read each other)
    anonymous = await _refused(gateway, {})
    assert anonymous == guarded | {"/search", "/stats", "/schedule", "/requests"}
    assert _routes(OPTIONS["admin_token"][0]) == guarded  # --help and docs/configuration.md
    (readme_row,) = [line for line in (ROOT / "README.md").read_text().splitlines() if "`--admin-token`" in line]
    assert _routes(readme_row) == guarded
    migration = (ROOT / "docs" / "migration-from-contextpilot.md").read_text()
    paragraph = migration[migration.index("## Admin token") :].split("\n\n")[1]
    assert _routes(paragraph) == guarded


async def test_stateless_reorder_needs_no_admin_token(gateway: AppFactory) -> None:
    async with gateway(admin_token="adm1n", api_key=["k1"], stateless=True) as client:
        key = {"Authorization": "Bearer k1"}
        assert (await client.post("/reorder", json={"contexts": [[1, 2]]}, headers=key)).status_code == 200
        assert (await client.post("/reorder", json={"contexts": [[1, 2]]})).status_code == 401
        assert (await client.post("/evict", json={"request_ids": []}, headers=key)).status_code == 401
