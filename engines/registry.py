"""Engine kind name -> adapter."""

from __future__ import annotations

from engines.base import EngineAdapter
from engines.generic import GENERIC
from engines.sglang import SGLANG
from engines.vllm import VLLM

__all__ = ["ENGINES", "get_engine"]

# llama.cpp takes no request id: the gateway pins requests to slots instead (engines.llamacpp).
LLAMACPP = EngineAdapter(name="llamacpp", reuse_overwrites=True)

ENGINES: dict[str, EngineAdapter] = {e.name: e for e in (SGLANG, VLLM, GENERIC, LLAMACPP)}


def get_engine(name: str) -> EngineAdapter:
    return ENGINES[name]
