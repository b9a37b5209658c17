"""The soak's hostile side: which requests are abandoned or hostile, slowloris connections, header floods, and the
report against issue 11's targets."""

from __future__ import annotations

import argparse
import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Hostile", "Mix", "flood", "hold_slowloris", "report_hostile"]


@dataclass
class Hostile:
    """What the hostile side of the load saw."""

    disconnects: int = 0
    slowloris_cut: int = 0
    slowloris_opened: int = 0
    floods: Counter[int] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)  # non-2xx answers to ordinary and hostile requests
    lost: int = 0


@dataclass(frozen=True)
class Mix:
    """Which requests are abandoned or hostile (decided per request index, reproducibly)."""

    disconnect_rate: float
    hostile_rate: float

    def of(self, i: int) -> str:
        draw = random.Random(i * 7919 + 1).random()
        if draw < self.disconnect_rate:
            return "disconnect"
        return "hostile" if draw < self.disconnect_rate + self.hostile_rate else "plain"


async def hold_slowloris(port: int, hostile: Hostile, stop: asyncio.Event) -> None:
    """Hold a connection that sends its headers one byte at a time; reconnect whenever the gateway cuts it."""
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: " + b"s" * 10_000
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        hostile.slowloris_opened += 1
        try:
            for byte in request:
                if stop.is_set():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    await asyncio.wait_for(reader.read(1), 0.5)
                    hostile.slowloris_cut += 1  # the server answered (408) or closed: it cut us off
                    break
                except TimeoutError:
                    continue
        except OSError:
            hostile.slowloris_cut += 1
        finally:
            writer.close()


async def flood(port: int, hostile: Hostile) -> None:
    """One request with 100 KB of headers (the gateway limit is 64 KB by default)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n" + b"X-Flood: " + b"f" * 100_000 + b"\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        hostile.floods[int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0] += 1
    except (OSError, TimeoutError):
        hostile.floods[0] += 1


def report_hostile(
    args: argparse.Namespace,
    count: int,
    hostile: Hostile,
    stall: tuple[float, float, float],
    rss_start: int,
    rss_end: int,
) -> int:
    """The hostile side: what was sent, what came back, and the targets of issue 11."""
    fives = sum(n for status, n in hostile.statuses.items() if status >= 500)
    growth = (rss_end - rss_start) / 1024
    print(f"\nHostile mix (all {count} requests, warm-up {args.warmup} included)")
    print(f"requests                  {count} ({args.disconnect_rate:.0%} abandoned, {args.hostile_rate:.0%} hostile)")
    print(f"lost                      {hostile.lost}")
    print(f"non-2xx by status         {dict(sorted(hostile.statuses.items())) or '{}'}")
    print(f"abandoned by the client   {hostile.disconnects}")
    print(f"header floods by status   {dict(sorted(hostile.floods.items()))}")
    slow = f"{args.slowloris} held, {hostile.slowloris_opened} opened, {hostile.slowloris_cut} cut by the gateway"
    print(f"slowloris                 {slow}")
    print(f"max event-loop stall      {stall[1] * 1000:.1f} ms of the gateway's own work between two 10 ms ticks")
    print(f"  (timer lateness         {stall[0] * 1000:.1f} ms wall clock, including time the OS gave to others)")
    print(f"  (longest full GC        {stall[2] * 1000:.1f} ms CPU, one of the causes of a long tick)")
    print(f"RSS after warm-up / end   {rss_start / 1024:.1f} MiB / {rss_end / 1024:.1f} MiB (growth {growth:+.1f} MiB)")
    failed = hostile.lost or fives or stall[1] > 0.05 or growth >= 50 or set(hostile.floods) - {431}
    print(f"hostile result: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0
