"""Any other OpenAI-compatible server: ``X-Request-Id`` header, cached tokens when it reports them.

A body ``rid`` or ``request_id`` the client sent becomes the header's id and is forwarded holding it, so the id
the client gets back in ``X-Request-Id`` is the one it chose (namespaced as ``gateway.ids`` says).
"""

from __future__ import annotations

from engines.base import EngineAdapter

__all__ = ["GENERIC"]

GENERIC = EngineAdapter(name="openai")
