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


async def _guarded(gateway: AppFactory) -> set[str]:
    guarded = set()
    async with gateway(admin_token="adm1n") as client:
        for path in INDEX_POSTS:
            if (await client.post(path, json={})).status_code == 401:
                guarded.add(path)
        for path in INDEX_GETS:
            if (await client.get(path)).status_code == 401:
                guarded.add(path)
    return guarded


async def test_help_readme_and_docs_name_exactly_the_guarded_routes(gateway: AppFactory) -> None:
    guarded = await _guarded(gateway)
    assert guarded == {"/reorder", "/build", "/evict", "/deduplicate", "/reset", "/insert", "/update"}
    assert _routes(OPTIONS["admin_token"][0]) == guarded  # --help and docs/configuration.md
    (readme_row,) = [line for line in (ROOT / "README.md").read_text().splitlines() if "`--admin-token`" in line]
    assert _routes(readme_row) == guarded
    migration = (ROOT / "docs" / "migration-from-contextpilot.md").read_text()
    paragraph = migration[migration.index("## Admin token") :].split("\n\n")[1]
    assert _routes(paragraph) == guarded


async def test_stateless_reorder_needs_no_token(gateway: AppFactory) -> None:
    async with gateway(admin_token="adm1n", stateless=True) as client:
        assert (await client.post("/reorder", json={"contexts": [[1, 2]]})).status_code == 200
        assert (await client.post("/evict", json={"request_ids": []})).status_code == 401
