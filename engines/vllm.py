"""vLLM v1: the request id travels in the ``X-Request-Id`` header (it wins over the body ``request_id``)."""

from __future__ import annotations

from engines.base import EngineAdapter

__all__ = ["VLLM"]

VLLM = EngineAdapter(name="vllm")
