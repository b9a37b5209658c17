"""Safety properties of interception over arbitrary text.

For any text (random unicode with lone surrogates, random compositions of format fragments and corpus lines,
mutated corpus prompts, items of every layout with arbitrary bodies and gaps, random JSON documents) and any mode, ``find_groups`` never raises and returns
well-formed, disjoint groups; for every group and every permutation, ``splice`` changes nothing but the order
of the block renderings (numbers rewritten by position), keeps each gap at its position, and can be undone;
the identity permutation gives back the exact text. Adversarial 1 MB inputs finish quickly (no catastrophic
backtracking, no quadratic scans).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.planning.intercept import MODES, Block, BlockGroup, NumberSpan, find_groups, splice, splice_all

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "prompts"
TEXTS = [path.read_bytes().decode("utf-8") for path in sorted(CORPUS.glob("*.txt"))]
LINES = sorted({line for text in TEXTS for line in text.splitlines(keepends=True)})
FRAGMENTS = [
    "[1] ",
    "[2] ",
    "[3] ",
    "[10] ",
    "1. ",
    "2. ",
    "3) ",
    "Document 1: ",
    "Document 2:\n",
    "Source [3]: ",
    "Passage 2 (x): ",
    "<doc>",
    "</doc>",
    "<documents>\n",
    "</documents>",
    '<document index="1">',
    '<document index="2" id="7">',
    "</document>",
    "<doc/>",
    "<source>",
    "</source>",
    "```\n",
    "~~~\n",
    "---\n",
    "=====\n",
    "## Document 1\n",
    "## Document 2\n",
    "### Source: a\n",
    "# Title\n",
    "Question: ",
    "Answer the question.",
    "Sources:\n",
    "Context:\n",
    "Here are the search results:\n",
    "References\n",
    "\n",
    "\n\n",
    "\r\n",
    " ",
    ":",
    '{"results": [',
    '{"a": "x"}',
    ", ",
    "]}",
    "file_path: /x.txt\n\n",
    "Context information is below.\n---------------------\n",
    "\n---------------------\nGiven the context information and not prior knowledge, answer the query.\n",
    "Use the following pieces of context to answer the question at the end. If you don't know the answer, "
    "just say that you don't know, don't try to make up an answer.\n\n",
    "Paris is the capital and most populous city of France. ",
    "Berlin is the capital and largest city of Germany. ",
    "東京は日本の首都である。",
    "\ud800",
]
SETTINGS = settings(
    max_examples=max(200, settings().max_examples),  # a hypothesis profile can raise it for a long hunt
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

characters = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),
    st.sampled_from("\n\n\n []<>/#-=:`{}\"',.0123456789\r\t"),
)
random_texts = st.text(characters, max_size=300)
composed_texts = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.sampled_from(LINES), st.text(characters, max_size=12)),
    max_size=40,
).map("".join)
modes = st.sampled_from(sorted(MODES))


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(TEXTS))
    for _ in range(draw(st.integers(0, 3))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 40)))
        text = text[:start] + draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(characters, max_size=8))) + text[end:]
    return text


LAYOUTS: dict[str, Callable[[int, str], str]] = {
    "bracket": lambda i, body: f"[{i + 1}] {body}",
    "dotted": lambda i, body: f"{i + 1}. {body}",
    "document": lambda i, body: f"Document {i + 1}:\n{body}",
    "source": lambda i, body: f"Source [{i + 1}]: {body}",
    "xml": lambda i, body: f'<document id="{i}">{body}</document>',
    "indexed": lambda i, body: f'<document index="{i + 1}">{body}</document>',
    "markdown": lambda i, body: f"## Document {i + 1}\n{body}",
    "plain": lambda i, body: body,
    "metadata": lambda i, body: f"file_path: /d{i}.txt\n\n{body}",
}
DOC_LINES = [line.strip() for line in LINES if len(line.strip()) > 30]


@st.composite
def structured_texts(draw: st.DrawFn) -> str:
    """A preamble, two to six items laid out in one format with arbitrary bodies and gaps, and a tail."""
    layout = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))]
    bodies = draw(
        st.lists(
            st.one_of(st.sampled_from(DOC_LINES), st.text(characters, min_size=1, max_size=60), composed_texts),
            min_size=2,
            max_size=6,
        )
    )
    gap = st.sampled_from(["\n", "\n\n", "\n---\n", "\n\n---\n\n", " ", "\n  ", "\r\n"])
    items = [layout(i, body) for i, body in enumerate(bodies)]
    joined = items[0] + "".join(draw(gap) + item for item in items[1:])
    preamble = draw(st.sampled_from(["", *FRAGMENTS, *LINES]))
    tail = draw(st.sampled_from(["", "\n\nQuestion: why?", "\nAnswer the question.", *FRAGMENTS]))
    return preamble + joined + tail


any_texts = st.one_of(random_texts, composed_texts, mutated_texts(), structured_texts())


def check_well_formed(text: str, groups: list[BlockGroup]) -> None:
    previous_end = 0
    for group in groups:
        assert len(group.blocks) >= 2
        assert previous_end <= group.start
        block_end = group.start
        for block in group.blocks:
            assert block_end <= block.start < block.end <= len(text)
            assert block.start <= block.content_start and block.content_end <= block.end
            block_end = block.end
            if block.number is not None:
                assert block.start <= block.number.start < block.number.end <= block.end
                assert text[block.number.start : block.number.end] == str(block.number.value)
        if group.number_base is not None:
            values = [block.number.value if block.number else None for block in group.blocks]
            assert values == list(range(group.number_base, group.number_base + len(group)))
        if group.after is not None:
            assert group.after >= group.end
        previous_end = max(group.end, group.after or group.end)


def moved(text: str, out: str, group: BlockGroup, order: list[int]) -> BlockGroup:
    """Check ``out`` block by block and return the group as it lies in ``out``."""
    base = group.number_base
    pos = group.start
    blocks = []
    for new, index in enumerate(order):
        block = group.blocks[index]
        number = block.number
        if number is not None and base is not None:
            label = str(base + new)
            rendering = f"{text[block.start : number.start]}{label}{text[number.end : block.end]}"
            shift = len(label) - (number.end - number.start)
            start_number = pos + number.start - block.start
            new_number: NumberSpan | None = NumberSpan(start_number, start_number + len(label), base + new)
        else:
            rendering, shift, new_number = text[block.start : block.end], 0, block.number
        assert out[pos : pos + len(rendering)] == rendering
        delta = pos - block.start
        content_shift = shift if block.content_start > (number.start if number else block.end) else 0
        blocks.append(
            Block(
                pos,
                pos + len(rendering),
                block.content_start + delta + content_shift,
                block.content_end + delta + shift,
                new_number if base is not None else block.number,
            )
        )
        pos += len(rendering)
        if new < len(order) - 1:
            gap = text[group.blocks[new].end : group.blocks[new + 1].start]
            assert out[pos : pos + len(gap)] == gap
            pos += len(gap)
    assert out[pos:] == text[group.end :]
    assert out[: group.start] == text[: group.start]
    return BlockGroup(group.format, group.label, tuple(blocks), base, None)


def check_splice(text: str, group: BlockGroup, order: list[int]) -> None:
    out = splice(text, group, order)
    regrouped = moved(text, out, group, order)
    assert sorted(regrouped.keys(out)) == sorted(group.keys(text))
    inverse = [0] * len(order)
    for new, index in enumerate(order):
        inverse[index] = new
    assert splice(out, regrouped, inverse) == text
    if group.format == "json_results":
        json.loads(out)
    kept = splice(text, group, order, renumber=False)
    gaps = [*group.gaps(text), ""]
    moved_blocks = "".join(group.blocks[index].render(text) + gap for index, gap in zip(order, gaps, strict=True))
    assert kept == group.preamble(text) + moved_blocks + group.tail(text)


@SETTINGS
@given(text=any_texts, mode=modes)
def test_find_groups_never_raises_and_groups_are_well_formed(text: str, mode: str) -> None:
    options = {"tag": "doc"} if mode == "xml_tag" and len(text) % 2 else {}
    groups = find_groups(text, mode, **options)
    check_well_formed(text, groups)
    assert splice_all(text, [(g, list(range(len(g)))) for g in groups]) == text


@SETTINGS
@given(data=st.data(), text=st.one_of(composed_texts, mutated_texts(), structured_texts()), mode=modes)
def test_splice_only_moves_blocks(data: st.DataObject, text: str, mode: str) -> None:
    groups = find_groups(text, mode)
    orders = [data.draw(st.permutations(range(len(group)))) for group in groups]
    for group, order in zip(groups, orders, strict=True):
        check_splice(text, group, order)
    expected = text
    for group, order in reversed(list(zip(groups, orders, strict=True))):
        expected = splice(expected, group, order)
    assert splice_all(text, list(zip(groups, orders, strict=True))) == expected


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(characters))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
results = st.lists(st.dictionaries(st.text(characters, max_size=6), json_values, max_size=4), min_size=0, max_size=6)


def _result_array(value: object) -> bool:
    return isinstance(value, list) and len(value) >= 2 and all(isinstance(item, dict) for item in value)


@SETTINGS
@given(
    data=st.data(),
    payload=st.dictionaries(
        st.sampled_from(["results", "documents", "sources", "data", "query", "x"]),
        st.one_of(results, json_values),
        max_size=5,
    ),
    indent=st.sampled_from([None, 0, 1, 2, "\t"]),
    ensure_ascii=st.booleans(),
)
def test_json_results_round_trip(
    data: st.DataObject, payload: dict[str, object], indent: int | str | None, ensure_ascii: bool
) -> None:
    text = json.dumps(payload, indent=indent, ensure_ascii=ensure_ascii)
    groups = find_groups(text)
    expected_keys = [key for key in ("results", "documents", "sources", "data") if _result_array(payload.get(key))]
    assert sorted(group.label for group in groups) == sorted(expected_keys)
    for group in groups:
        order = data.draw(st.permutations(range(len(group))))
        out = splice(text, group, order)
        reordered = json.loads(out)
        original = payload[group.label]
        assert isinstance(original, list)
        assert reordered[group.label] == [original[i] for i in order]
        assert {**reordered, group.label: None} == {**payload, group.label: None}


MEGABYTE = 1_000_000
LARGE = {
    "spaces": " " * MEGABYTE,
    "newlines": "\n" * MEGABYTE,
    "blank lines with spaces": " \n" * (MEGABYTE // 2),
    "bracket markers": "[1] " * (MEGABYTE // 4),
    "numbered lines": "".join(f"[{i % 7 + 1}] some document text that is long\n" for i in range(MEGABYTE // 40)),
    "unclosed tags": "<doc>" * (MEGABYTE // 5),
    "nested tags": "<doc>" * (MEGABYTE // 11) + "</doc>" * (MEGABYTE // 11),
    "closed tags": "<doc>x</doc>" * (MEGABYTE // 12),
    "fences": "```\n" * (MEGABYTE // 4),
    "separator lines": "---\n" * (MEGABYTE // 4),
    "headers": "## Document 1\n" * (MEGABYTE // 14),
    "deep json": "[" * MEGABYTE,
    "deep json object": '{"a":' * (MEGABYTE // 5),
    "json results": json.dumps({"results": [{"t": "x" * 20}] * (MEGABYTE // 30)}),
    "colon lines": ":\n" * (MEGABYTE // 2),
    "surrogates": "\ud800[1] x\udfff\n" * (MEGABYTE // 11),
    "one long line": "word " * (MEGABYTE // 5),
}


@pytest.mark.parametrize("name", sorted(LARGE))
def test_one_megabyte_inputs_finish_quickly(name: str) -> None:
    text = LARGE[name]
    started = time.perf_counter()
    groups = find_groups(text)
    splice_all(text, [(g, list(range(len(g)))[::-1]) for g in groups])
    # a generous bound on a shared 2-core machine: a quadratic scan of 1 MB would take minutes
    assert time.perf_counter() - started < 10
