"""The index API: ContextPilot's ``/reorder``, ``/evict``, ``/deduplicate``, ``/reset``, ``/stats``, ... routes.

Owns ``routes`` (the handlers) and ``bodies`` (their request and answer bodies). May import the base modules,
``wire``, ``edge`` (auth), ``planning`` (residency) and ``upstream`` (the replica set).
"""

__all__: list[str] = []
