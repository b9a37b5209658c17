"""llama-server slots: which slot a request should take, and what each slot holds afterwards.

llama-server keeps one prompt's KV per slot (``-np N``) and reuses the longest common prefix when the next
request lands on the same slot; it takes no request id. So the gateway pins every request to a slot with
``id_slot``: the slot whose held blocks share the longest prefix with the request's, else the least recently
used one. When a request takes a slot, the previous occupant's tail is overwritten: the gateway releases that
request from its index (the shared prefix now belongs to the new request, which is committed in its place).

Pure and synchronous (single writer: the event loop); ``discover_slots`` is the only I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import httpx

__all__ = ["Path", "Slot", "SlotTable", "discover_slots"]

Path = tuple[tuple[Hashable, tuple[int, ...]], ...]
"""What a request holds: its block groups as ``(prefix key, blocks in sent order)``, in prompt order."""


@dataclass(slots=True)
class Slot:
    id: int
    request_id: str | None = None
    path: Path = ()
    in_flight: int = 0
    last_used: int = 0


def _shared(held: Path, wanted: Path) -> int:
    """Blocks ``wanted`` shares with ``held`` from the start (groups must match key by key)."""
    total = 0
    for (held_key, held_blocks), (key, blocks) in zip(held, wanted, strict=False):
        if held_key != key:
            break
        common = 0
        for a, b in zip(held_blocks, blocks, strict=False):
            if a != b:
                break
            common += 1
        total += common
        if common < len(blocks) or common < len(held_blocks):
            break
    return total


@dataclass(slots=True)
class SlotTable:
    """The gateway's picture of a llama-server's slots."""

    slots: list[Slot]
    _clock: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def of(cls, count: int) -> SlotTable:
        if count < 1:
            raise ValueError("a llama-server has at least one slot")
        return cls([Slot(i) for i in range(count)])

    def choose(self, path: Path) -> int:
        """Reserve the slot for a request holding ``path``: idle first, then longest shared prefix, then LRU.

        Every ``choose`` (and every ``reserve``) is matched by one ``finish`` when the request ends.
        """
        best = max(self.slots, key=lambda s: (s.in_flight == 0, _shared(s.path, path), -s.last_used))
        self.reserve(best.id)
        return best.id

    def reserve(self, slot_id: int) -> None:
        slot = self.slots[slot_id]
        slot.in_flight += 1
        slot.last_used = next(self._clock)

    def occupy(self, slot_id: int, request_id: str, path: Path) -> str | None:
        """Record that ``request_id`` now holds the slot; return the previous holder (its tail is overwritten)."""
        slot = self.slots[slot_id]
        previous = slot.request_id
        slot.request_id, slot.path = request_id, path
        return previous if previous != request_id else None

    def finish(self, slot_id: int) -> None:
        slot = self.slots[slot_id]
        slot.in_flight = max(0, slot.in_flight - 1)

    def holders(self) -> Sequence[str | None]:
        return [slot.request_id for slot in self.slots]


async def discover_slots(client: httpx.AsyncClient) -> int | None:
    """The slot count of the llama-server behind ``client`` (``/props``, else ``/slots``), None if unknown."""
    try:
        props = await client.get("/props", timeout=5.0)
        if props.status_code == 200:
            total = props.json().get("total_slots")
            if isinstance(total, int) and total > 0:
                return total
        slots = await client.get("/slots", timeout=5.0)
        if slots.status_code == 200 and isinstance(listing := slots.json(), list) and listing:
            return len(listing)
    except (httpx.HTTPError, ValueError):
        return None
    return None
