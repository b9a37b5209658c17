"""The whole-prompt prefix index: chunk names are cumulative, the index is bounded and trims prompts from their ends."""

from __future__ import annotations

import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from scheduler.prefixes import CHUNK_BYTES, MAX_CHUNKS, MAX_MARKS, Chain, PrefixIndex, common


def chain_of(*pieces: bytes) -> tuple[int, ...]:
    chain = Chain()
    for piece in pieces:
        chain.update(piece)
    return chain.freeze()


@given(st.binary(max_size=3 * CHUNK_BYTES), st.lists(st.integers(0, 3 * CHUNK_BYTES), max_size=6))
def test_a_chain_does_not_depend_on_how_the_prompt_is_cut(data: bytes, cuts: list[int]) -> None:
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]
    assert chain_of(*pieces) == chain_of(data)
    assert len(chain_of(data)) == len(data) // CHUNK_BYTES


@given(st.binary(min_size=1, max_size=4 * CHUNK_BYTES), st.binary(max_size=2 * CHUNK_BYTES), st.binary(max_size=600))
def test_two_prompts_share_exactly_the_whole_chunks_of_their_common_prefix(head: bytes, a: bytes, b: bytes) -> None:
    one, two = head + a, head + b
    same = next((i for i, (x, y) in enumerate(zip(one, two, strict=False)) if x != y), min(len(one), len(two)))
    assert common(chain_of(one), chain_of(two)) == same // CHUNK_BYTES


def test_a_chain_stops_growing_at_its_bound() -> None:
    chain = Chain()
    for _ in range(MAX_CHUNKS + 10):
        chain.update(b"x" * CHUNK_BYTES)
    assert len(chain.freeze()) == MAX_CHUNKS


def test_the_index_holds_every_prefix_of_what_was_sent_and_nothing_else() -> None:
    index = PrefixIndex(1000)
    sent = chain_of(b"a" * 10 * CHUNK_BYTES)
    index.add(sent)
    assert index.match(sent) == 10
    assert index.match(chain_of(b"a" * 4 * CHUNK_BYTES + b"b" * 6 * CHUNK_BYTES)) == 4
    assert index.match(chain_of(b"b" * 10 * CHUNK_BYTES)) == 0
    assert index.match(()) == 0
    index.clear()
    assert index.match(sent) == 0 and len(index) == 0


def test_the_index_is_bounded_and_trims_the_least_recent_prompts_from_their_ends() -> None:
    index = PrefixIndex(12)
    old, new = chain_of(b"o" * 8 * CHUNK_BYTES), chain_of(b"n" * 8 * CHUNK_BYTES)
    index.add(old)
    index.add(new)
    assert len(index) == 12
    assert index.match(new) == 8
    assert index.match(old) == 4, "the old prompt's head outlives its tail"
    index.add(old)  # sent again: fresh
    assert index.match(old) == 8 and index.match(new) == 4


def marks_of(*pieces: bytes) -> list[int]:
    chain = Chain(marked=True)
    for piece in pieces:
        chain.update(piece)
    return chain.marks


@given(st.lists(st.sampled_from([b"a", b"b\n", b"\n", b"\n\n", b"c" * 300, b"d\n\ne"]), max_size=12),
       st.lists(st.integers(0, 2000), max_size=6))  # fmt: skip
def test_marks_name_each_paragraph_start_whatever_the_pieces(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    marks = marks_of(data)
    assert marks_of(*(data[a:b] for a, b in itertools.pairwise(points))) == marks
    ends = [m.end() for m in re.finditer(rb"\n\n", data)]
    assert marks == [marks_of_prefix(data[:end]) for end in ends]  # a mark names the whole prefix, to the byte
    assert len(set(marks)) == len(marks)


def marks_of_prefix(data: bytes) -> int:
    chain = Chain()
    chain.update(data)
    return chain.mark()


def test_a_mark_tells_a_short_paragraph_apart_where_chunks_cannot() -> None:
    """Two prompts that differ within their last, unfinished chunk: the same chunk names, different marks."""
    head = b"system prompt " * 30
    one, two = head + b"short document one\n\n", head + b"short document two\n\n"
    assert chain_of(one) == chain_of(two)
    index = PrefixIndex(100)
    first = Chain(marked=True)
    first.update(one + b"and what follows")
    index.add(first.freeze(), first.marks)
    assert index.holds(marks_of_prefix(one)) and not index.holds(marks_of_prefix(two))


def test_marks_stop_at_the_chains_bound() -> None:
    chain = Chain(marked=True)
    chain.update(b"x\n\n" * (MAX_MARKS + 5))
    assert len(chain.marks) == MAX_MARKS
    chain = Chain(marked=True)
    chain.update(b"y" * (MAX_CHUNKS * CHUNK_BYTES) + b"\n\nz\n\n")
    assert chain.marks == [] and chain.mark() == -1  # past the bound a position is not named
    chain = Chain()  # a chain that only names chunks (the prompt as sent, for routing)
    chain.update(b"x\n\n" * 4)
    assert chain.marks == []
