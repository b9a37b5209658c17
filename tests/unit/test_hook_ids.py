"""Pure parts of the hook: the ids it reports, its per-cache bookkeeping, its configuration and ``.pth`` line."""

from __future__ import annotations

import pytest

from engines.hooks import INDEX_URL_VARS, PromptTails, index_url, pth_line, vllm_external_id
from scheduler.ids import mint_request_id, normalize_request_id


@pytest.mark.parametrize(
    ("internal", "expected"),
    [
        ("req-ab12-0123abcd", "req-ab12"),
        ("chatcmpl-req-ab12-89abcdef", "chatcmpl-req-ab12"),
        ("req-ab12", "req-ab12"),  # too short to carry a suffix
        ("req-ab12-0123ABCD", "req-ab12-0123ABCD"),  # vLLM's suffix is lowercase hex
        ("req-ab12-0123abc", "req-ab12-0123abc"),
    ],
)
def test_vllm_suffix_is_stripped_exactly(internal: str, expected: str) -> None:
    assert vllm_external_id(internal) == expected


def test_vllm_suffix_is_kept_when_vllm_does_not_randomise() -> None:
    assert vllm_external_id("req-ab12-0123abcd", randomized=False) == "req-ab12-0123abcd"


def test_what_the_hook_reports_normalises_to_the_stamped_id() -> None:
    stamped = mint_request_id()
    for engine_id in (f"chatcmpl-{stamped}-1a2b3c4d", f"cmpl-{stamped}-deadbeef", stamped):
        assert normalize_request_id(vllm_external_id(engine_id)) == stamped


def test_residency_reports_every_request_of_an_entry_once() -> None:
    tails = PromptTails(limit=10)
    tails.attach("a", ["x"])
    tails.attach("b", ["x", "y"])  # two KV-cache groups
    assert tails.evict("y") == ["b"]
    assert tails.evict("x") == ["a"]  # b was already reported and forgotten
    assert tails.evict("x") == []
    assert tails.by_entry == {} and tails.by_rid == {}


def test_residency_reattach_moves_the_tail() -> None:
    tails = PromptTails(limit=10)
    tails.attach("a", ["x"])
    tails.attach("a", ["z"])  # a later checkpoint of the same request
    assert tails.evict("x") == []
    assert tails.evict("z") == ["a"]


def test_residency_is_bounded_and_forgets_the_oldest() -> None:
    tails = PromptTails(limit=2)
    assert tails.attach("a", ["x"]) == []
    assert tails.attach("b", ["y"]) == []
    assert tails.attach("c", ["z"]) == ["a"]
    assert tails.evict("x") == []
    assert sorted(tails.clear()) == ["b", "c"]


def test_index_url_prefers_prefixgate_and_honours_contextpilot() -> None:
    assert index_url({}) is None
    assert index_url({"PREFIXGATE_INDEX_URL": "  "}) is None
    assert index_url({"CONTEXTPILOT_INDEX_URL": "http://cp:8765"}) == "http://cp:8765"
    both = {"PREFIXGATE_INDEX_URL": "http://pg:8765", "CONTEXTPILOT_INDEX_URL": "http://cp:8765"}
    assert index_url(both) == "http://pg:8765"


def test_pth_line_is_one_import_line_that_checks_the_environment_first() -> None:
    line = pth_line("prefixgate_hook")
    assert line.startswith("import ") and line.count("\n") == 1
    assert all(name in line for name in INDEX_URL_VARS)
    assert line.index("os.environ") < line.index("__import__")
