"""Configuration of the simulated engine: one frozen object, built by the CLI or by tests."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SimConfig"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What the simulated engine serves and how it models cost.

    Times are per token in microseconds. With ``serial_prefill`` the prefills of concurrent requests queue behind
    one another (one accelerator), so uncached tokens cost throughput, not only latency; decoding is modelled as
    batched (each request pays its own per-token delay, concurrently).
    """

    model: str = "sim"
    capacity_tokens: int = 262_144
    prefill_us_per_token: float = 20.0
    decode_us_per_token: float = 0.0
    serial_prefill: bool = True
    cache_output: bool = True
    default_max_tokens: int = 16
    max_tokens_limit: int = 131_072
    max_n: int = 128
    max_body_bytes: int = 64 * 1024 * 1024
    max_owners_per_node: int = 256
    record_requests: int = 1000
    evict_url: str | None = None
    evict_token: str | None = None
    evict_flush_ms: float = 5.0
    evict_max_pending: int = 100_000
