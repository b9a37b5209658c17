"""The prompt fixture corpus: every fixture yields exactly the groups listed in ``expected.json``.

Each fixture ``tests/fixtures/prompts/<name>.txt`` has an entry in ``expected.json``: optional ``mode``, ``tag``
and ``separator`` for ``find_groups``, and the expected groups in text order, each with its ``format``, its
number of ``blocks`` and optionally its ``label``, ``number_base`` and the text the last block must end with
(``last_ends_with``, which pins the end of a group that has no closing delimiter). Negatives (``neg_*``) expect
no group and must come out of a splice byte-identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from gateway.planning.intercept import BlockGroup, find_groups, splice, splice_all

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "prompts"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))


def _read(name: str) -> str:
    with open(CORPUS / name, encoding="utf-8", newline="") as handle:
        return handle.read()


def _find(name: str) -> tuple[str, list[BlockGroup]]:
    spec = EXPECTED[name]
    options = {key: spec[key] for key in ("mode", "tag", "separator") if key in spec}
    text = _read(name)
    return text, find_groups(text, **options)


def test_corpus_size_and_sidecar_match_the_files() -> None:
    files = {path.name for path in CORPUS.glob("*.txt")}
    assert files == set(EXPECTED)
    positives = [name for name, spec in EXPECTED.items() if spec["groups"]]
    negatives = [name for name, spec in EXPECTED.items() if not spec["groups"]]
    assert len(positives) >= 60
    assert len(negatives) >= 20
    assert all(name.startswith("neg_") for name in negatives)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_yields_the_expected_groups(name: str) -> None:
    text, groups = _find(name)
    expected = EXPECTED[name]["groups"]
    assert [(g.format, len(g)) for g in groups] == [(e["format"], e["blocks"]) for e in expected]
    for group, spec in zip(groups, expected, strict=True):
        if "label" in spec:
            assert group.label == spec["label"]
        if "number_base" in spec:
            assert group.number_base == spec["number_base"]
        if "last_ends_with" in spec:
            assert text[: group.end].endswith(spec["last_ends_with"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_identity_splice_is_byte_identical(name: str) -> None:
    text, groups = _find(name)
    assert splice_all(text, [(g, range(len(g))) for g in groups]) == text
    for group in groups:
        assert splice(text, group, list(range(len(group)))) == text


@pytest.mark.parametrize("name", sorted(n for n, spec in EXPECTED.items() if spec["groups"]))
def test_fixture_reorder_moves_only_blocks(name: str) -> None:
    text, groups = _find(name)
    rng = random.Random(name)
    for group in groups:
        order = list(range(len(group)))
        rng.shuffle(order)
        out = splice(text, group, order)
        assert out.startswith(group.preamble(text))
        assert out.endswith(group.tail(text))
        assert sorted(out) == sorted(text) or group.number_base is not None
        if group.number_base is None:
            moved = [group.blocks[i].render(text) for i in order]
            gaps = [*group.gaps(text), ""]
            assert out[group.start : len(out) - len(group.tail(text))] == "".join(
                block + gap for block, gap in zip(moved, gaps, strict=True)
            )
        if group.format == "json_results":
            before, after = json.loads(text), json.loads(out)
            items_before = before[group.label] if group.label else before
            items_after = after[group.label] if group.label else after
            assert items_after == [items_before[i] for i in order]
            if group.label:
                assert {**after, group.label: None} == {**before, group.label: None}


@pytest.mark.parametrize("name", sorted(n for n, spec in EXPECTED.items() if spec["groups"]))
def test_fixture_reversed_is_found_again_and_restores_the_original(name: str) -> None:
    """A rewritten prompt is detected the same way, so the next turn of a conversation sees the same blocks."""
    text, groups = _find(name)
    reversed_text = splice_all(text, [(g, list(range(len(g)))[::-1]) for g in groups])
    regrouped = find_groups(reversed_text, **_options(name))
    assert [(g.format, len(g)) for g in regrouped] == [(g.format, len(g)) for g in groups]
    assert splice_all(reversed_text, [(g, list(range(len(g)))[::-1]) for g in regrouped]) == text


def _options(name: str) -> dict[str, Any]:
    spec = EXPECTED[name]
    return {key: spec[key] for key in ("mode", "tag", "separator") if key in spec}


@pytest.mark.parametrize("name", sorted(n for n, spec in EXPECTED.items() if not spec["groups"]))
def test_negatives_yield_nothing_in_auto_mode_whatever_the_fixture_says(name: str) -> None:
    assert find_groups(_read(name)) == []


def _long_prompt(count: int, size: int) -> str:
    rng = random.Random(count * 7919 + size)
    words = ["cache", "prefix", "token", "block", "retrieval", "engine", "radix", "eviction", "request", "latency"]
    docs = [" ".join(rng.choice(words) for _ in range(size // 8)) for _ in range(count)]
    body = "\n".join(f'<document id="d{i}" source="s{i}">{doc}</document>' for i, doc in enumerate(docs))
    numbered = "\n\n".join(f"[{i + 1}] {doc}" for i, doc in enumerate(docs))
    return f"System.\n<documents>\n{body}\n</documents>\n\nSources:\n{numbered}\n\nQuestion: why?"


@pytest.mark.parametrize(("count", "size"), [(10, 2_000), (200, 500), (1_000, 100), (5, 100_000)])
def test_long_generated_prompts(count: int, size: int) -> None:
    text = _long_prompt(count, size)
    groups = find_groups(text)
    assert [(g.format, len(g)) for g in groups] == [("xml_tag", count), ("numbered", count)]
    assert groups[1].tail(text) == "\n\nQuestion: why?"
    order = list(range(count))[::-1]
    out = splice_all(text, [(g, order) for g in groups])
    assert len(out) == len(text)
    assert out.endswith("\n\nQuestion: why?")
    assert out.split("[1] ", 1)[1].startswith(groups[1].blocks[-1].content(text)[:50])
