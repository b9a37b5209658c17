"""prefixgate's in-engine eviction hook: tells the gateway which requests' prompts left an engine's prefix cache.

Code that runs inside engine processes: stdlib only, relative imports only, so that the same folder also installs
on its own into an engine's environment as the package ``prefixgate_hook`` (``python engines/hooks --install``),
without anything else of prefixgate. Inside prefixgate's environment it is ``engines.hooks``.

- ``sender``: :class:`EvictionReporter`, the background thread that POSTs ids to the gateway's ``/evict``.
- ``tracking``: per-cache state (which requests each cache entry is the prompt tail of) and the sink.
- ``patching``: the one method-wrapper shape, class/instance patching, the import finder.
- ``vllm_cache``, ``sglang_cache``: what to wrap in vLLM 0.33 and SGLang 0.5.23, and why.
- ``install``: ``prefixgate install-hook`` and the standalone install.

Activation: vLLM's plugin entry point (:func:`vllm_plugin`) or the ``.pth`` line calls :func:`activate`, which
does nothing unless ``PREFIXGATE_INDEX_URL`` (or ``CONTEXTPILOT_INDEX_URL``) is set. It then starts the sender and
puts a ``sys.meta_path`` finder in front that patches an engine module right after it is first imported (and
patches those already imported). Only engine processes that import those modules pay anything. The environment
is read here directly: this code runs inside engines, not under the gateway's ``Settings``. Variables:
``PREFIXGATE_INDEX_URL``, ``PREFIXGATE_ADMIN_TOKEN``, ``PREFIXGATE_HOOK_QUEUE``, ``PREFIXGATE_HOOK_MAX_TRACKED``,
``PREFIXGATE_HOOK_SGLANG``, ``PREFIXGATE_HOOK_LOG_LEVEL`` (docs/configuration.md). A failure in the hook's own
bookkeeping is logged once and never reaches the engine.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Mapping

from .install import INDEX_URL_VARS, pth_line
from .patching import Patch, PatchingFinder
from .patching import patch_module as _patch_module
from .sender import EvictionReporter
from .sglang_cache import PATCHES as _SGLANG_PATCHES
from .sglang_cache import instrument_sglang_radix_cache, instrument_sglang_unified_cache
from .tracking import PromptTails, int_env, set_sink
from .vllm_cache import PATCHES as _VLLM_PATCHES
from .vllm_cache import vllm_external_id

__all__ = [
    "INDEX_URL_VARS",
    "PATCHES",
    "TOKEN_VAR",
    "EvictionReporter",
    "PromptTails",
    "activate",
    "active",
    "index_url",
    "instrument_sglang_radix_cache",
    "instrument_sglang_unified_cache",
    "patch_module",
    "patch_targets",
    "pth_line",
    "set_sink",
    "vllm_external_id",
    "vllm_plugin",
]

TOKEN_VAR = "PREFIXGATE_ADMIN_TOKEN"  # noqa: S105 (the variable's name, not a secret)
PATCHES: Mapping[str, Patch] = {**_VLLM_PATCHES, **_SGLANG_PATCHES}

logger = logging.getLogger("prefixgate.hook")
_active: EvictionReporter | None = None


def index_url(environ: Mapping[str, str] = os.environ) -> str | None:
    """The gateway URL the hook reports to, or ``None`` when the hook is off."""
    for name in INDEX_URL_VARS:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def patch_targets() -> tuple[str, ...]:
    """The engine modules the hook patches when they are imported."""
    return tuple(PATCHES)


def patch_module(module: types.ModuleType) -> bool:
    """Patch one supported engine module in place; warns (never raises) when its internals do not fit."""
    return _patch_module(module, PATCHES)


def active() -> EvictionReporter | None:
    """The sender of this process once :func:`activate` turned the hook on."""
    return _active


def _configure_logging(environ: Mapping[str, str]) -> None:
    # At .pth time nothing is configured yet: give the hook its own stderr handler so its lines show up
    # once, whatever logging set-up the engine does later.
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    level = environ.get("PREFIXGATE_HOOK_LOG_LEVEL", "INFO").strip().upper()
    logger.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)


def activate(environ: Mapping[str, str] = os.environ) -> EvictionReporter | None:
    """Turn the hook on in this process when an index URL is configured; idempotent.

    Never raises: a broken hook must not keep an engine (or any other Python process) from starting.
    """
    global _active
    url = index_url(environ)
    if _active is not None or url is None:
        return _active
    try:
        _configure_logging(environ)
        queue = int_env("PREFIXGATE_HOOK_QUEUE", 100_000, environ)
        reporter = EvictionReporter(url, token=environ.get(TOKEN_VAR) or None, max_queue=queue)
    except ValueError as exc:
        logger.warning("prefixgate hook: disabled, bad index URL (%s)", exc)
        return None
    except Exception:
        logger.exception("prefixgate hook: disabled, activation failed")
        return None
    _active = reporter
    set_sink(reporter.report)
    sys.meta_path.insert(0, PatchingFinder(PATCHES))
    for name in PATCHES:
        module = sys.modules.get(name)
        if module is not None:
            patch_module(module)
    logger.debug("prefixgate hook: active in pid %d, reporting to %s", os.getpid(), url)
    return reporter


def vllm_plugin() -> None:
    """vLLM's ``vllm.general_plugins`` entry point: vLLM calls it in each of its processes before any work."""
    reporter = activate()
    if reporter is not None:
        logger.debug("prefixgate hook: loaded as vLLM plugin in pid %d", os.getpid())
