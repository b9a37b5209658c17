"""llama-server slots: which slot a request should take, and what each slot holds afterwards.

llama-server keeps one prompt's KV per slot (``-np N``) and reuses the longest common prefix when the next
request lands on the same slot; it takes no request id. Left to itself (no ``id_slot``), it picks the idle slot
whose prompt shares the largest fraction of the new prompt (``--slot-prompt-similarity``, 0.1 by default), else
the least recently used idle slot, saving the prompt it overwrites to its host-RAM prompt cache (``--cache-ram``)
and loading the best cached one instead. A request pinned with ``id_slot`` skips all that: the slot's prompt is
overwritten and, when it shares little, not saved.

So the gateway pins a request only when it knows better (``choose``): an idle slot holds a useful prefix of the
*whole* prompt as forwarded (at least one chunk, :mod:`scheduler.prefixes`), and llama.cpp's own choice might not
find it (the gateway pinned that slot itself, or the shared prefix is below llama.cpp's similarity threshold).
Otherwise ``id_slot`` is left out and the gateway records where llama.cpp will put the request (``guess``: the
same rule llama.cpp applies, on the gateway's picture of the slots), marked as a guess. A pinned request always
leaves a true picture of its slot, so a wrong guess costs at most one request.

When a request takes a slot, the previous occupant's tail is overwritten: the gateway releases that request from
its block index (the shared prefix now belongs to the new request, which is committed in its place).

Pure and synchronous (single writer: the event loop); ``discover_slots`` is the only I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from scheduler.prefixes import common

__all__ = ["SIMILARITY", "Slot", "SlotTable", "discover_slots"]

SIMILARITY = 0.1  # llama-server's default --slot-prompt-similarity


@dataclass(slots=True)
class Slot:
    id: int
    request_id: str | None = None
    chain: tuple[int, ...] = ()  # the chunk names of the prompt it holds (``scheduler.prefixes``)
    known: bool = True  # False: the gateway guessed that llama.cpp put the prompt here
    in_flight: int = 0
    last_used: int = -1  # llama.cpp's ``t_last_used``: set when the slot is released


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

    def held(self, chain: Sequence[int]) -> int:
        """The most leading chunks of ``chain`` any slot holds."""
        return max((common(slot.chain, chain) for slot in self.slots), default=0)

    def choose(self, chain: Sequence[int]) -> int | None:
        """The slot to pin a request whose prompt has the chunk names ``chain`` to, or None (leave it to llama.cpp).

        Idle slots only while one is idle (llama.cpp never waits for a busy slot itself); the one holding the
        longest prefix, a slot the gateway pinned before winning ties. Pinned only when it holds at least one
        chunk, and a guessed slot only when llama.cpp's similarity rule would miss it.
        """
        idle = [slot for slot in self.slots if slot.in_flight == 0] or self.slots
        best = max(idle, key=lambda s: (common(s.chain, chain), s.known))
        shared = common(best.chain, chain)
        if shared == 0:
            return None
        if not best.known and shared > SIMILARITY * len(chain):
            return None  # llama.cpp finds it by similarity, wherever it really is
        return best.id

    def guess(self, chain: Sequence[int]) -> int:
        """Where llama.cpp puts a request sent without ``id_slot``: the idle slot sharing the largest fraction
        above its threshold, else the least recently used idle slot (ties: the highest id, as llama.cpp scans)."""
        idle = [slot for slot in self.slots if slot.in_flight == 0] or self.slots
        similar = max(idle, key=lambda s: common(s.chain, chain))
        if chain and common(similar.chain, chain) > SIMILARITY * len(chain):
            return similar.id
        return min(idle, key=lambda s: (s.last_used, -s.id)).id

    def reserve(self, slot_id: int) -> None:
        self.slots[slot_id].in_flight += 1

    def occupy(self, slot_id: int, request_id: str, chain: Sequence[int], *, known: bool = True) -> str | None:
        """Record that ``request_id`` now holds the slot; return the previous holder (its tail is overwritten)."""
        slot = self.slots[slot_id]
        previous = slot.request_id
        slot.request_id, slot.chain, slot.known = request_id, tuple(chain), known
        return previous if previous != request_id else None

    def finish(self, slot_id: int) -> None:
        slot = self.slots[slot_id]
        slot.in_flight = max(0, slot.in_flight - 1)
        slot.last_used = next(self._clock)

    def clear(self) -> None:
        """The server restarted (or its cache was reset): no slot holds anything."""
        for slot in self.slots:
            slot.request_id, slot.chain, slot.known = None, (), True

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
