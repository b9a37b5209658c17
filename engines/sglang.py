"""SGLang: the request id travels in the body field ``rid``; the response ``id`` echoes it."""

from __future__ import annotations

from engines.base import EngineAdapter

__all__ = ["SGLANG"]

SGLANG = EngineAdapter(name="sglang", body_id_field="rid")
