"""ContextPilot 0.5.0's own ``ContextPilotIndexClient``, unchanged, against a live prefixgate.

The client module is loaded from the released wheel (``make contextpilot-client`` caches it); only its
``requests`` dependency is needed, not the rest of ContextPilot's stack.
"""

from __future__ import annotations

import os
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.servers import serve_in_thread

pytestmark = pytest.mark.contextpilot

_MEMBER = "contextpilot/server/http_client.py"


@pytest.fixture(scope="module")
def client_module() -> types.ModuleType:
    wheel = os.environ.get("PREFIXGATE_CONTEXTPILOT_WHEEL") or str(
        Path.home() / ".cache/prefixgate/wheels/contextpilot-0.5.0-py3-none-any.whl"
    )
    if not Path(wheel).is_file():
        pytest.skip("contextpilot 0.5.0 wheel not cached: run `make contextpilot-client` (make test does)")
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(_MEMBER).decode()
    module = types.ModuleType("contextpilot_http_client")
    module.__file__ = f"{wheel}/{_MEMBER}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@pytest.fixture
def cp(client_module: types.ModuleType) -> Iterator[Any]:
    app = create_app(load_settings(environ={}, upstream="http://127.0.0.1:9"))
    with serve_in_thread(app) as base, client_module.ContextPilotIndexClient(base, timeout=10.0) as client:
        yield client


def test_health_and_is_ready_on_fresh_server(cp: Any) -> None:
    assert cp.is_ready()
    assert cp.health()["mode"] == "live"


def test_reorder_tuple_contract(cp: Any) -> None:
    contexts = [[0, 1, 2], [0, 1, 5], [3, 4, 0]]
    reordered, order = cp.reorder(contexts)
    assert sorted(order) == [0, 1, 2]
    for position, index in enumerate(order):
        assert sorted(reordered[position]) == sorted(contexts[index])


def test_reorder_raw_build_schedule_evict_stats(cp: Any) -> None:
    raw = cp.reorder_raw([["alpha", "beta"], ["beta", "alpha", "gamma"]], deduplicate=True)
    assert raw["mode"] == "initial"
    assert raw["deduplication"]["enabled"] is True
    built = cp.build([[7, 8], [8, 7, 9]])
    assert built["mode"] == "incremental"
    scheduled = cp.schedule([[1, 2], [2, 1]])  # the client's schedule() posts to /reorder
    assert scheduled["mode"] == "incremental"
    assert len(cp.get_requests()["request_ids"]) == 6
    evicted = cp.evict([f"chatcmpl-{raw['request_ids'][0]}"])
    assert evicted["removed_count"] == 1
    assert evicted["conversations_cleared"] == 1
    assert cp.get_stats()["index_stats"]["num_requests"] == 5


def test_deduplicate_and_reset(cp: Any) -> None:
    first = cp.reorder_raw([[1, 2, 3]], deduplicate=True)
    turn2 = cp.deduplicate([[2, 3, 4]], parent_request_ids=[first["request_ids"][0]])
    assert turn2["results"][0]["overlapping_docs"] == [2, 3]
    assert cp.reset()["status"] == "success"
    assert cp.get_stats()["index_stats"]["num_requests"] == 0


def test_search_insert_update_answer(cp: Any) -> None:
    inserted = cp.insert([4, 5, 6], search_path=[])
    assert inserted["request_id"].startswith("req-")
    assert cp.search([4, 5, 9])["prefix_length"] == 2
    assert cp.update_node([], 10)["status"] == "success"
