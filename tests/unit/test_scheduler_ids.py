"""Request ids: minting and normalising engine-mangled ids."""

import re

import pytest

from scheduler import LiveIndex
from scheduler.ids import mint_request_id, normalize_request_id, normalize_request_ids, request_id_candidates


def test_minted_ids_are_req_32_hex_and_unique() -> None:
    ids = {mint_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"req-[0-9a-f]{32}", rid) for rid in ids)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("req-abc", "req-abc"),
        ("cmpl-req-abc", "req-abc"),
        ("chatcmpl-req-abc", "req-abc"),
        ("batch-req-abc", "req-abc"),
        ("cmpl-req-ab12-0-1a2b3c4d", "req-ab12"),
        ("req-ab12-3-ff", "req-ab12"),
        ("req-ab12-x-ff", "req-ab12-x-ff"),  # not the vLLM shape
        ("client-id-0-ff", "client-id-0-ff"),  # the suffix rule applies to req- ids only
        ("chatcmpl-xyz", "xyz"),
        ("HEALTH_CHECK_1", None),
        ("cmpl-HEALTH_CHECK", None),
        ("cmpl-", None),
    ],
)
def test_normalize(raw: str, expected: str | None) -> None:
    assert normalize_request_id(raw) == expected


def test_normalize_many_dedups_in_order_and_drops_health_checks() -> None:
    raw = ["cmpl-req-b-0-ff", "req-a", "HEALTH_CHECK", "req-b", "chatcmpl-req-a", "req-c"]
    assert normalize_request_ids(raw) == ["req-b", "req-a", "req-c"]


def test_candidates_for_vllm_random_suffix() -> None:
    assert request_id_candidates("req-abc-Zx8kQ2aa") == ["req-abc-Zx8kQ2aa", "req-abc"]
    assert request_id_candidates("cmpl-myid-12345678") == ["myid-12345678", "myid", "cmpl-myid-12345678"]
    assert request_id_candidates("HEALTH_CHECK-1") == []


def test_resolve_tries_candidates_against_the_index() -> None:
    index = LiveIndex()
    index.commit("k", "req-abc", [1, 2])
    index.commit("k", "client-12345678", [3])
    assert index.resolve("req-abc-Zx8kQ2aa") == "req-abc"  # suffix stripped only because the base is known
    assert index.resolve("cmpl-req-abc-0-1a2b") == "req-abc"
    assert index.resolve("client-12345678") == "client-12345678"  # exact id preferred over its base
    assert index.resolve("req-zzz-Zx8kQ2aa") is None
    assert index.resolve("HEALTH_CHECK") is None
