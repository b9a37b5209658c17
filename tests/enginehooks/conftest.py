"""Tests against the real vLLM 0.33 and SGLang 0.5.23 cache classes; collected only where those are importable.

The main venv has no torch/vllm/sglang: there these modules are not collected at all, and
``tests/e2e/test_hooks_real_engines.py`` runs this directory in the engines venv instead (built by
``make engines-venv``). In the engines venv the engine modules are imported once, with torchvision and triton
stubbed, and the hook patches their classes in place (as it does inside a real engine after activation).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Iterator

import pytest

ENGINES = ("torch", "vllm", "sglang")
AVAILABLE = all(importlib.util.find_spec(name) is not None for name in ENGINES)

if not AVAILABLE:
    collect_ignore_glob = ["test_*.py"]
else:
    from engines import hooks as hook
    from tests.enginehooks import stubs

    stubs.install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time UserWarnings about CUDA-only features
        for _name in hook.patch_targets():
            hook.patch_module(importlib.import_module(_name))


@pytest.fixture
def reported() -> Iterator[list[str]]:
    """Every request id the patched engines report, in order."""
    ids: list[str] = []
    hook.set_sink(ids.extend)
    try:
        yield ids
    finally:
        hook.set_sink(lambda _ids: None)
