"""The built-in simulated prefix-caching engine: tokenizer, radix cache, OpenAI-compatible ASGI app and CLI."""

from engines.sim.app import SimApp, create_sim_app
from engines.sim.cache import CacheStats, RadixCache
from engines.sim.cli import build_server, main
from engines.sim.config import SimConfig
from engines.sim.tokenizer import Tokenizer

__all__ = ["CacheStats", "RadixCache", "SimApp", "SimConfig", "Tokenizer", "build_server", "create_sim_app", "main"]
