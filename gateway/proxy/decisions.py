"""The operator view of recent proxied requests (``--decision-log N``): what was done to each, by request id.

Off by default; on, it needs the admin token (``Settings`` refuses to start without one) and keeps the last N planned
completion requests (a request refused before planning leaves nothing). A record holds the route, status, replica,
the engine's cached tokens, the ``X-Prefixgate-Result`` fields and, per block group, its format, the decision and
its reason, whether it moved, and its blocks in the order the client sent them and in the order they were
forwarded: block ids (16 hex digits of a hash of the block's content; ``LISTED_BLOCKS`` per request at most),
never the prompt text. With
``--decision-log-text`` the body as sent and as forwarded are kept too, each cut at ``TEXT_CAP`` bytes, within
``TEXT_BUDGET`` bytes for all records (the oldest bodies are dropped first; their records stay).

``GET /debug/requests/{id}``: one record (404 when it is not, or no longer, kept). ``GET /debug/requests?limit=N``:
the most recent N records, newest first (default 20). Both need ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cachetools import LRUCache
from litestar import Request, get
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from gateway.edge.access import Access
from gateway.errors import InvalidRequest, NotFound
from gateway.planning.outcome import Choice

if TYPE_CHECKING:
    from gateway.proxy.pipeline import Exchange

__all__ = ["DEFAULT_LIMIT", "LISTED_BLOCKS", "TEXT_BUDGET", "TEXT_CAP", "DecisionLog", "decision_routes"]

DEFAULT_LIMIT = 20
TEXT_CAP = 256 << 10  # bytes kept of each body
TEXT_BUDGET = 64 << 20  # bytes of bodies kept in all
LISTED_BLOCKS = 512  # block ids kept per request (groups past it give their counts only)


class _Group(NamedTuple):
    """One group, compactly: its block ids in forwarded order (8 bytes each) and ``order`` (2 bytes each)."""

    format: str
    blocks: int
    action: str
    reason: str
    moved: bool
    ids: bytes
    order: bytes

    @classmethod
    def of(cls, choice: Choice, room: int) -> _Group:
        listed = bool(choice.ids) and len(choice.order) == len(choice.ids) <= room
        ids = b"".join((block & _MASK).to_bytes(8, "big") for block in choice.ids) if listed else b""
        order = array("H", choice.order).tobytes() if listed else b""
        return cls(choice.format, choice.blocks, choice.decision.action, choice.decision.reason, choice.moved, ids,
                   order)  # fmt: skip

    def wire(self) -> dict[str, Any]:
        group: dict[str, Any] = {"format": self.format, "blocks": self.blocks, "action": self.action,
                                 "reason": self.reason, "moved": self.moved}  # fmt: skip
        if not self.ids:
            group["listed"] = False  # past LISTED_BLOCKS for the request, or a group without ids
            return group
        forwarded = [self.ids[i : i + 8].hex() for i in range(0, len(self.ids), 8)]
        order = array("H")
        order.frombytes(self.order)
        sent = [""] * len(forwarded)
        for position, index in enumerate(order):
            sent[index] = forwarded[position]
        group["sent"], group["forwarded"] = sent, forwarded
        group["order"] = order.tolist()  # forwarded position -> the block's position as sent
        return group


_MASK = 0xFFFF_FFFF_FFFF_FFFF


def _text(body: bytes, size: int) -> dict[str, Any]:
    return {"text": body.decode("utf-8", "replace"), "bytes": size, "truncated": size > len(body)}


class DecisionLog:
    """The last ``size`` planned requests' records, by request id (a ring: the oldest leaves first)."""

    def __init__(self, size: int, text: bool = False) -> None:
        if size < 1:
            raise ValueError("a decision log keeps at least one request")
        self.size = size
        self._records: OrderedDict[str, tuple[dict[str, Any], tuple[_Group, ...]]] = OrderedDict()
        self._texts: LRUCache[str, tuple[bytes, int, bytes, int]] | None = None
        if text:
            self._texts = LRUCache(maxsize=TEXT_BUDGET, getsizeof=lambda kept: len(kept[0]) + len(kept[2]) + 1)

    def __len__(self) -> int:
        return len(self._records)

    def add(self, call: Exchange, status: int, latency: float) -> None:
        """Record what was done to ``call`` (answered with ``status`` after ``latency`` seconds); on the event loop."""
        planned = call.planned
        if planned is None:
            return
        record = {
            "request_id": call.request_id,
            "route": call.route,
            "status": status,
            "time": round(time.time(), 3),
            "latency_ms": round(latency * 1000, 3),
            "replica": call.upstream.name if call.upstream is not None else None,
            "cached_tokens": call.cached_tokens,
            "result": dict(planned.result),
        }
        groups = []
        room = LISTED_BLOCKS
        for choice in planned.choices:
            group = _Group.of(choice, room)
            room -= len(group.ids) // 8
            groups.append(group)
        records = self._records
        records.pop(call.request_id, None)  # an id sent again: its latest request
        records[call.request_id] = (record, tuple(groups))
        while len(records) > self.size:
            gone, _ = records.popitem(last=False)
            if self._texts is not None:
                self._texts.pop(gone, None)
        if self._texts is not None and call.body is not None:
            sent, forwarded = call.body.raw, call.payload
            self._texts[call.request_id] = (sent[:TEXT_CAP], len(sent), forwarded[:TEXT_CAP], len(forwarded))

    def _wire(self, request_id: str) -> dict[str, Any]:
        record, groups = self._records[request_id]
        return {**record, "groups": [group.wire() for group in groups]}

    def get(self, request_id: str) -> dict[str, Any] | None:
        if request_id not in self._records:
            return None
        out = self._wire(request_id)
        if self._texts is not None:
            kept = self._texts.get(request_id)
            out["text"] = None if kept is None else {"sent": _text(*kept[:2]), "forwarded": _text(*kept[2:])}
        return out

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recent records, newest first (without their texts)."""
        out: list[dict[str, Any]] = []
        for request_id in reversed(self._records):
            if len(out) >= limit:
                break
            out.append(self._wire(request_id))
        return out


def _limit(raw: str | None, size: int) -> int:
    if raw is None:
        return min(DEFAULT_LIMIT, size)
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidRequest("limit must be a positive integer", param="limit", code="invalid_limit")
    return min(int(raw), size)


def decision_routes(log: DecisionLog, access: Access) -> Sequence[HTTPRouteHandler]:
    """``GET /debug/requests`` and ``GET /debug/requests/{request_id}``, admin token required."""

    @get("/debug/requests", sync_to_thread=False)
    def recent(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The most recent proxied requests' decisions, newest first (``?limit=``, default 20)."""
        access.require_admin(request.headers)
        records = log.recent(_limit(request.query_params.get("limit"), log.size))
        return {"object": "list", "data": records, "kept": len(log), "size": log.size}

    @get("/debug/requests/{request_id:str}", sync_to_thread=False)
    def one(request: Request[Any, Any, Any], request_id: FromPath[str]) -> dict[str, Any]:
        """What was done to one proxied request, by its ``X-Request-Id``."""
        access.require_admin(request.headers)
        record = log.get(request_id)
        if record is None:
            raise NotFound(f"no decision kept for request {request_id!r}", param="request_id", code="not_kept")
        return record

    return [recent, one]
