"""Per-engine knowledge: how to stamp request ids, read cached tokens and learn cache residency.

Import the submodules (``engines.base``, ``engines.registry``, ...) directly: this package imports nothing,
so that the eviction hook (``engines.hooks``), which runs inside engine processes, stays import-light.
"""

__all__: list[str] = []
