"""Per-engine knowledge: how to stamp request ids, read cached tokens and learn cache residency."""

from engines.base import EngineAdapter, cached_tokens_from_usage
from engines.registry import ENGINES, get_engine

__all__ = ["ENGINES", "EngineAdapter", "cached_tokens_from_usage", "get_engine"]
