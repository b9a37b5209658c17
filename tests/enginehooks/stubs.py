"""Import shim for the engines venv: stand-ins for ``torchvision`` and ``triton``, which the cache classes never call.

SGLang's import chain reaches ``import torchvision.transforms`` (multimodal configs) and a hard ``import triton``.
The only torchvision wheels on the index are CUDA builds that fail to load against CPU torch, and triton is 1 GB,
so both are answered by a ``sys.meta_path`` finder whose modules hand out stub classes for any attribute. The
classes can be subclassed, called (acting as pass-through decorators) and indexed, so module-level code such as
``@triton.jit`` or ``InterpolationMode.NEAREST_EXACT`` evaluates. Nothing on the radix-cache path calls them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["STUBBED", "install"]

STUBBED = ("torchvision", "triton")


class _StubMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub(name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return _stub("result")

    def __getitem__(cls, key: Any) -> Any:
        return _stub("item")


def _stub(name: str) -> type:
    return _StubMeta(str(name), (), {})


class _StubModule(types.ModuleType):
    __version__ = "0.0.0+stub"  # transformers' is_torchvision_available() reads it

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub(name)


class _StubLoader(importlib.abc.Loader):
    # A spec with loader=None would become an empty namespace package; this loader makes real stub modules.
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def install() -> None:
    """Put the stub finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(finder, _StubFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())
