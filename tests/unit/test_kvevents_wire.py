"""The KV-event decoder on hand-built msgpack payloads: both event encodings, hashes, unknown and malformed input."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.kvevents import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventDecodeError,
    UnknownEvent,
    decode_batch,
    decode_event,
    decode_seq,
    encode_seq,
)

U64_MAX = 2**64 - 1
I64_MIN = -(2**63)


def payload(*parts: Any) -> bytes:
    return msgspec.msgpack.encode(list(parts))


def test_current_vllm_tagged_maps_with_unknown_fields() -> None:
    stored = {
        "type": "BlockStored",
        "block_hashes": [15760518052499183552, U64_MAX],
        "parent_block_hash": None,
        "token_ids": [151644, 872],
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, None],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
        "session_id": "req-1",
        "a_field_from_the_future": {"x": [1, 2]},
    }
    removed = {"type": "BlockRemoved", "block_hashes": [U64_MAX], "medium": "GPU", "group_idx": 0, "locality": 3}
    batch = decode_batch(payload(1789095808.83, [stored, removed, {"type": "AllBlocksCleared"}], 0))
    assert batch == EventBatch(
        ts=1789095808.83,
        events=(
            BlockStored(
                block_hashes=(15760518052499183552, U64_MAX),
                token_ids=(151644, 872),
                block_size=16,
                medium="GPU",
                session_id="req-1",
                group_idx=0,
            ),
            BlockRemoved(block_hashes=(U64_MAX,), medium="GPU", group_idx=0),
            AllBlocksCleared(),
        ),
        dp_rank=0,
    )


def test_legacy_positional_arrays_and_missing_rank() -> None:
    events = [
        ["BlockStored", [1, 2], None, [10, 11, 12, 13], 2, None, "GPU"],
        ["BlockRemoved", [1], None],
        ["AllBlocksCleared"],
    ]
    batch = decode_batch(payload(5, events))
    assert batch.ts == 5.0
    assert batch.dp_rank is None
    assert batch.events == (
        BlockStored(block_hashes=(1, 2), token_ids=(10, 11, 12, 13), block_size=2, medium="GPU"),
        BlockRemoved(block_hashes=(1,)),
        AllBlocksCleared(),
    )


def test_oldest_positional_shape_without_medium() -> None:
    batch = decode_batch(payload(1.0, [["BlockStored", [7], 6, [1], 1, 3], ["BlockRemoved", [7]]]))
    assert batch.events == (
        BlockStored(block_hashes=(7,), parent_block_hash=6, token_ids=(1,), block_size=1, lora_id=3),
        BlockRemoved(block_hashes=(7,)),
    )


def test_positional_position_seven_is_sglang_metadata_or_vllm_lora_name() -> None:
    sglang = ["BlockStored", [-5], None, [1], 1, None, "GPU", {"session_id": "rid-9", "cache_salt": "s"}]
    vllm = ["BlockStored", [5], None, [1], 1, None, "GPU", "adapter", [None], 1, "sliding_window"]
    first, second = decode_batch(payload(1.0, [sglang, vllm], 2)).events
    assert first == BlockStored(block_hashes=(-5,), token_ids=(1,), block_size=1, medium="GPU", session_id="rid-9")
    assert second == BlockStored(
        block_hashes=(5,), token_ids=(1,), block_size=1, medium="GPU", lora_name="adapter", group_idx=1
    )


def test_sglang_maps_with_nested_metadata_and_signed_hashes() -> None:
    event = {
        "type": "BlockStored",
        "block_hashes": [I64_MIN, -1],
        "parent_block_hash": 42,
        "token_ids": [1, 2],
        "block_size": 1,
        "lora_id": None,
        "medium": "CPU_PINNED",
        "metadata": {"session_id": "rid-1"},
    }
    (stored,) = decode_batch(payload(1.0, [event], 1)).events
    assert stored == BlockStored(
        block_hashes=(I64_MIN, -1),
        parent_block_hash=42,
        token_ids=(1, 2),
        block_size=1,
        medium="CPU_PINNED",
        session_id="rid-1",
    )


def test_bytes_hashes_and_one_batch_mixing_both_encodings() -> None:
    h1, h2 = bytes(range(32)), b"\xff" * 32
    events = [
        {
            "type": "BlockStored",
            "block_hashes": [h1, h2],
            "parent_block_hash": b"\x00",
            "token_ids": [],
            "block_size": 16,
        },
        ["BlockRemoved", [h1], "GPU"],
    ]
    stored, removed = decode_batch(payload(2.5, events)).events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == (h1, h2)
    assert stored.parent_block_hash == b"\x00"
    assert removed == BlockRemoved(block_hashes=(h1,), medium="GPU")


def test_batch_as_a_map() -> None:
    raw = msgspec.msgpack.encode({"ts": 3.0, "events": [["AllBlocksCleared"]], "attn_dp_rank": 4})
    assert decode_batch(raw) == EventBatch(ts=3.0, events=(AllBlocksCleared(),), dp_rank=4)


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "BlockUpdated", "block_hashes": [1]},
        ["BlockInactive", [1], "GPU"],
    ],
)
def test_unknown_event_types_are_kept_as_unknown(raw: object) -> None:
    event = decode_event(raw)
    assert isinstance(event, UnknownEvent)
    assert event.type in {"BlockUpdated", "BlockInactive"}
    assert not event.malformed


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "BlockStored", "block_hashes": [1.5], "token_ids": []},
        {"type": "BlockStored", "block_hashes": [True], "token_ids": []},
        {"type": "BlockStored", "block_hashes": "abc", "token_ids": []},
        {"type": "BlockStored", "block_hashes": [1], "token_ids": ["a"]},
        {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": "p", "token_ids": []},
        {"type": "BlockRemoved"},
        ["BlockRemoved"],
        {"block_hashes": [1]},
        {"type": 3},
        [1, 2],
        [],
        42,
        None,
    ],
)
def test_malformed_events_do_not_fail_the_batch(raw: object) -> None:
    batch = decode_batch(payload(1.0, [raw, {"type": "AllBlocksCleared"}]))
    assert isinstance(batch.events[0], UnknownEvent)
    assert batch.events[0].malformed
    assert batch.events[1] == AllBlocksCleared()


def test_wrongly_typed_optional_fields_are_dropped() -> None:
    event = decode_event(
        {"type": "BlockStored", "block_hashes": [1], "medium": 3, "session_id": 7, "group_idx": "g", "block_size": None}
    )
    assert event == BlockStored(block_hashes=(1,))


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",  # never used in msgpack
        b"",
        msgspec.msgpack.encode(5),
        msgspec.msgpack.encode([1.0]),
        msgspec.msgpack.encode(["ts", []]),
        msgspec.msgpack.encode([True, []]),
        msgspec.msgpack.encode([1.0, {"type": "AllBlocksCleared"}]),
        msgspec.msgpack.encode({"events": []}),
    ],
)
def test_payloads_that_are_not_batches_raise(raw: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(raw)


def test_sequence_frames() -> None:
    assert decode_seq((5).to_bytes(8, "big")) == 5
    assert decode_seq(encode_seq(2**62)) == 2**62
    assert decode_seq(END_SEQ) == -1
    assert encode_seq(-1) == END_SEQ == b"\xff" * 8
    with pytest.raises(KVEventDecodeError):
        decode_seq(b"\x00\x01")


_hashes = st.lists(st.one_of(st.integers(I64_MIN, U64_MAX), st.binary(min_size=1, max_size=32)), max_size=5)


@settings(max_examples=200, deadline=None)
@given(
    hashes=_hashes,
    parent=st.one_of(st.none(), st.integers(I64_MIN, U64_MAX), st.binary(max_size=32)),
    tokens=st.lists(st.integers(0, 2**31), max_size=20),
    block_size=st.integers(1, 64),
    medium=st.sampled_from([None, "GPU", "CPU", "CPU_PINNED", "DISK"]),
)
def test_both_encodings_decode_to_the_same_event(
    hashes: list[int | bytes], parent: int | bytes | None, tokens: list[int], block_size: int, medium: str | None
) -> None:
    as_map = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": None,
        "medium": medium,
    }
    as_array = ["BlockStored", hashes, parent, tokens, block_size, None, medium]
    from_map, from_array = decode_batch(payload(0.0, [as_map, as_array])).events
    assert from_map == from_array
    assert isinstance(from_map, BlockStored)
    assert from_map.block_hashes == tuple(hashes)


_msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(I64_MIN, U64_MAX),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.binary(max_size=12),
        st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type"]),
    ),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(raw=_msgpack_values)
def test_any_msgpack_value_decodes_or_raises_the_decode_error(raw: object) -> None:
    for candidate in (raw, [1.0, raw], [1.0, [raw], 0]):
        try:
            batch = decode_batch(msgspec.msgpack.encode(candidate))
        except KVEventDecodeError:
            continue
        assert isinstance(batch, EventBatch)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_the_decode_error(raw: bytes) -> None:
    try:
        decode_batch(raw)
    except KVEventDecodeError:
        pass
