"""Any other OpenAI-compatible server: ``X-Request-Id`` header, cached tokens when it reports them."""

from __future__ import annotations

from engines.base import EngineAdapter

__all__ = ["GENERIC"]

GENERIC = EngineAdapter(name="openai")
