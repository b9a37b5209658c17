"""Shared state: index changes published to, and replayed from, other gateways through Redis.

Owns ``replication``. May import the base modules, ``planning`` (residency changes) and ``upstream`` (replicas).
"""

__all__: list[str] = []
