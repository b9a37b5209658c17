"""Block identity: ints pass through, text is hashed stably."""

from hashlib import blake2b

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.blocks import block_id, block_ids


@given(st.integers())
def test_ints_of_any_size_pass_through(value: int) -> None:
    assert block_id(value) == value


def test_64_bit_and_beyond() -> None:
    for value in (2**63 - 1, 2**64 - 1, -(2**63), 2**64, 2**200, -(2**200)):
        assert block_id(value) == value


def test_strings_hash_to_a_known_stable_unsigned_64_bit_int() -> None:
    expected = int.from_bytes(blake2b(b"hello", digest_size=8, person=b"prefixgate-blk").digest(), "big")
    assert block_id("hello") == expected
    assert block_id(b"hello") == expected
    assert 0 <= block_id("hello") < 2**64


@given(st.text())
def test_strings_are_deterministic_and_not_python_hash(text: str) -> None:
    assert block_id(text) == block_id(text)
    assert block_id(text) == block_id(text.encode("utf-8", "surrogatepass"))


def test_distinct_texts_get_distinct_ids() -> None:
    texts = [f"document {number}" for number in range(10_000)]
    assert len(set(block_ids(texts))) == len(texts)


def test_mixed_blocks_keep_order_and_duplicates() -> None:
    ids = block_ids([3, "a", b"a", 3, -1])
    assert ids[0] == 3 and ids[3] == 3 and ids[4] == -1
    assert ids[1] == ids[2] != 3


@pytest.mark.parametrize("bad", [True, False, 1.5, None, ("a",)])
def test_rejects_other_types(bad: object) -> None:
    with pytest.raises(TypeError):
        block_id(bad)  # type: ignore[arg-type]
