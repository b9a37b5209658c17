"""Native KV events from vLLM and SGLang: the wire decoder, the request attribution tracker, the ZMQ subscriber.

``wire`` decodes batches (both event encodings), ``tracker`` turns them into "these gateway requests are no
longer cached" (``on_evicted``/``on_reset``), ``subscriber`` follows one publisher endpoint on the event loop
and repairs sequence gaps through the replay socket. Only ``subscriber`` needs pyzmq (the ``zmq`` extra); it is
imported on first use so that the decoder and the tracker work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engines.kvevents.tracker import (
    DEFAULT_MEDIUM,
    EvictedCallback,
    KVEventCounters,
    KVEventTracker,
    ReleasePolicy,
    ResetCallback,
)
from engines.kvevents.wire import (
    END_SEQ,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    KVEventDecodeError,
    UnknownEvent,
    decode_batch,
    decode_event,
    decode_seq,
    encode_seq,
)

if TYPE_CHECKING:
    from engines.kvevents.subscriber import KVEventSubscriber

__all__ = [
    "DEFAULT_MEDIUM",
    "END_SEQ",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "EvictedCallback",
    "EventBatch",
    "KVEvent",
    "KVEventCounters",
    "KVEventDecodeError",
    "KVEventSubscriber",
    "KVEventTracker",
    "ReleasePolicy",
    "ResetCallback",
    "UnknownEvent",
    "decode_batch",
    "decode_event",
    "decode_seq",
    "encode_seq",
]


def __getattr__(name: str) -> Any:
    if name == "KVEventSubscriber":
        from engines.kvevents.subscriber import KVEventSubscriber

        return KVEventSubscriber
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
