"""vLLM v1: the request id travels in the ``X-Request-Id`` header (it wins over the body ``request_id``).

A body ``request_id`` (or ``rid``) the client sent is the request's id (``gateway.ids``): the header carries it, and
the body field is forwarded holding the same effective id.
"""

from __future__ import annotations

from engines.base import EngineAdapter

__all__ = ["VLLM"]

VLLM = EngineAdapter(name="vllm")
