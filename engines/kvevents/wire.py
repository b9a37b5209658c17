"""The KV-event wire format shared by vLLM and SGLang: frames, sequence numbers and event batches.

A publisher sends three-frame ZMQ messages ``[topic, seq, payload]``: ``seq`` is an 8-byte big-endian counter
that starts at 0 in every publisher process, ``payload`` a msgpack ``EventBatch`` ``[ts, events, dp_rank?]``
(the trailing rank is omitted when unset). Events come in two encodings, and one batch may mix them:

* tagged maps (vLLM since PR #42892, SGLang 0.5.x): ``{"type": "BlockStored", "block_hashes": [...], ...}``;
* legacy positional arrays: ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium, ...]``, ``["BlockRemoved", block_hashes, medium, ...]``, ``["AllBlocksCleared"]``. Position 7 of a
  stored block is vLLM's ``lora_name`` (a string) or SGLang's metadata map (``{"session_id", "cache_salt"}``).

The payload is decoded into plain Python objects first and then interpreted, so either shape, unknown fields
and unknown event types all decode: an unknown or malformed event becomes an :class:`UnknownEvent` that the
tracker counts, and only a payload that is not a batch at all raises :class:`KVEventDecodeError`.
Block hashes stay as the engine sent them: ``int`` (vLLM's unsigned low 64 bits, SGLang's signed int64) or
``bytes`` (vLLM with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, TypeGuard

import msgspec

__all__ = [
    "END_SEQ",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "KVEvent",
    "KVEventDecodeError",
    "UnknownEvent",
    "decode_batch",
    "decode_event",
    "decode_seq",
    "encode_seq",
]

BlockHash: TypeAlias = int | bytes

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The sequence frame that ends a replay answer."""

_decoder = msgspec.msgpack.Decoder()


class KVEventDecodeError(ValueError):
    """The payload is not an event batch in any known encoding."""


class BlockStored(msgspec.Struct, frozen=True, gc=False):
    """Blocks that became resident, in chain order; ``session_id`` is the id the gateway stamped."""

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    session_id: str | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, frozen=True, gc=False):
    """Blocks that left ``medium`` (``None``: the engine did not say which tier)."""

    block_hashes: tuple[BlockHash, ...]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, frozen=True, gc=False):
    """The engine dropped its whole prefix cache (``/reset_prefix_cache``)."""


class UnknownEvent(msgspec.Struct, frozen=True, gc=False):
    """An event this decoder does not understand: a new type, or a known type with fields of the wrong shape."""

    type: str
    malformed: bool = False


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared | UnknownEvent


class EventBatch(msgspec.Struct, frozen=True, gc=False):
    """One publisher step: its events in order."""

    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None = None


class _Malformed(Exception):
    pass


def encode_seq(seq: int) -> bytes:
    """The 8-byte big-endian sequence frame (signed, so that ``-1`` is :data:`END_SEQ`)."""
    return seq.to_bytes(8, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    """A sequence frame as an int; :data:`END_SEQ` reads as ``-1``."""
    if len(frame) != 8:
        raise KVEventDecodeError(f"sequence frame of {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big", signed=True)


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one msgpack ``EventBatch`` payload, in either event encoding."""
    try:
        raw = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets invalid UTF-8 in a str through
        raise KVEventDecodeError(f"not msgpack: {exc}") from exc
    if isinstance(raw, Mapping):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank", raw.get("attn_dp_rank"))
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise KVEventDecodeError("an event batch is an array [ts, events, dp_rank?]")
    if not _is_number(ts) or not isinstance(events, list):
        raise KVEventDecodeError("an event batch needs a numeric ts and a list of events")
    return EventBatch(
        ts=float(ts),
        events=tuple(decode_event(event) for event in events),
        dp_rank=rank if _is_int(rank) else None,
    )


def decode_event(raw: object) -> KVEvent:
    """Interpret one decoded event, tagged map or positional array; never raises."""
    if isinstance(raw, Mapping):
        tag = raw.get("type")
        fields: Mapping[str, Any] = raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag = raw[0]
        fields = _positional_fields(tag, raw)
    else:
        return UnknownEvent(type="", malformed=True)
    if not isinstance(tag, str):
        return UnknownEvent(type="", malformed=True)
    try:
        if tag == "BlockStored":
            return _block_stored(fields)
        if tag == "BlockRemoved":
            return BlockRemoved(
                block_hashes=_hashes(fields.get("block_hashes")),
                medium=_opt_str(fields.get("medium")),
                group_idx=_opt_int(fields.get("group_idx")),
            )
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
    except _Malformed:
        return UnknownEvent(type=tag, malformed=True)
    return UnknownEvent(type=tag)


_STORED_POSITIONS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")


def _positional_fields(tag: str, raw: Sequence[Any]) -> dict[str, Any]:
    """Name the fields of a legacy array-shaped event (the struct field order of the engines)."""
    values = raw[1:]
    if tag == "BlockStored":
        fields = dict(zip(_STORED_POSITIONS, values, strict=False))
        extra = values[len(_STORED_POSITIONS) :]
        if extra and isinstance(extra[0], Mapping):
            fields["metadata"] = extra[0]  # SGLang's BlockStoredWithMetadata
        elif extra:
            fields["lora_name"] = extra[0]  # vLLM: lora_name, extra_keys, group_idx, ...
            if len(extra) > 2:
                fields["group_idx"] = extra[2]
        return fields
    if tag == "BlockRemoved":
        return dict(zip(("block_hashes", "medium", "group_idx"), values, strict=False))
    return {}


def _block_stored(fields: Mapping[str, Any]) -> BlockStored:
    session_id = fields.get("session_id")
    metadata = fields.get("metadata")
    if session_id is None and isinstance(metadata, Mapping):
        session_id = metadata.get("session_id")
    token_ids = fields.get("token_ids")
    if token_ids is None:
        token_ids = []
    if not isinstance(token_ids, list) or not all(_is_int(token) for token in token_ids):
        raise _Malformed
    parent = fields.get("parent_block_hash")
    block_size = fields.get("block_size")
    return BlockStored(
        block_hashes=_hashes(fields.get("block_hashes")),
        parent_block_hash=None if parent is None else _hash(parent),
        token_ids=tuple(token_ids),
        block_size=block_size if _is_int(block_size) else 0,
        lora_id=_opt_int(fields.get("lora_id")),
        medium=_opt_str(fields.get("medium")),
        lora_name=_opt_str(fields.get("lora_name")),
        session_id=_opt_str(session_id),
        group_idx=_opt_int(fields.get("group_idx")),
    )


def _hashes(value: object) -> tuple[BlockHash, ...]:
    if not isinstance(value, list):
        raise _Malformed
    return tuple(_hash(item) for item in value)


def _hash(value: object) -> BlockHash:
    if isinstance(value, bytes) or _is_int(value):
        return value
    raise _Malformed


def _opt_str(value: object) -> str | None:
    """Optional text fields: a wrong type is dropped rather than failing the whole event."""
    return value if isinstance(value, str) else None


def _opt_int(value: object) -> int | None:
    return value if _is_int(value) else None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
