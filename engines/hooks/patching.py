"""How the hook gets into an engine: one method-wrapper shape, class/instance patching, and the import finder.

:func:`observe` is the only wrapper: engine code runs unchanged between an optional ``before`` and ``after``, both
through :func:`~.tracking.safely`. :func:`wrap` applies a ``{method name: wrapper}`` table to a class (every
instance) or to one instance, and marks it so that a second copy of the hook (package and standalone both
installed) leaves it alone. :class:`PatchingFinder` sits first on ``sys.meta_path`` and, for the engine modules in
its table, wraps the real loader so that the module is patched right after it executes; it finds nothing itself.
Anything that does not match is left alone with a warning; an untested version whose internals match is patched
with a warning.
"""

from __future__ import annotations

import functools
import importlib.machinery
import logging
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .tracking import safely

__all__ = ["MARK", "Patch", "PatchingFinder", "Wrap", "observe", "patch_module", "wrap"]

logger = logging.getLogger("prefixgate.hook")

MARK = "__prefixgate_hook__"
Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True, slots=True)
class Patch:
    """How to patch one engine module: the engine it belongs to, the versions tested, and the patch itself.

    ``apply`` returns ``None`` when it patched, ``"skipped"`` when there was nothing to do, or why it did not fit.
    """

    engine: str
    tested: tuple[str, ...]
    apply: Callable[[types.ModuleType], str | None]


def observe(
    after: Callable[..., object] | None = None, *, before: Callable[..., Any] | None = None, always: bool = False
) -> Wrap:
    """The one wrapper shape: ``before(self, *args, **kwargs)``, the method, ``after(self, seen, result, ...)``.

    ``seen`` is what ``before`` returned (``None`` without one, or when it failed); ``after`` gets the method's
    own arguments after ``result``. With ``always`` it also runs (``result=None``) when the method raised.
    """

    def decorate(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def wrapper(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            seen = safely(before, self, *args, **kwargs) if before is not None else None
            if after is None:
                return orig(self, *args, **kwargs)
            try:
                result = orig(self, *args, **kwargs)
            except BaseException:
                if always:
                    safely(after, self, seen, None, *args, **kwargs)
                raise
            safely(after, self, seen, result, *args, **kwargs)
            return result

        return wrapper

    return decorate


def wrap(target: Any, wraps: Mapping[str, Wrap]) -> str | None:
    """Wrap methods of a class, or of one instance (bound with ``MethodType``); ``"skipped"`` if done before."""
    if isinstance(target, type):
        return _wrap_class(target, wraps)
    if target.__dict__.get(MARK) or type(target).__dict__.get(MARK):
        return "skipped"
    for name, wrapper in wraps.items():
        target.__dict__[name] = types.MethodType(wrapper(getattr(type(target), name)), target)
    target.__dict__[MARK] = tuple(wraps)
    return None


def _wrap_class(cls: type, wraps: Mapping[str, Wrap]) -> str | None:
    if cls.__dict__.get(MARK):
        # Another copy of the hook (the package and the standalone install both present) came first.
        logger.debug("prefixgate hook: %s already patched", cls.__qualname__)
        return "skipped"
    if getattr(cls, "_contextpilot_patched", False):
        logger.warning("prefixgate hook: ContextPilot's hook also patches %s; evictions go to both", cls.__qualname__)
    for name, wrapper in wraps.items():
        setattr(cls, name, wrapper(getattr(cls, name)))
    setattr(cls, MARK, tuple(wraps))
    return None


def patch_module(module: types.ModuleType, patches: Mapping[str, Patch]) -> bool:
    """Patch one supported engine module in place; warns (never raises) when its internals do not fit."""
    patch = patches[module.__name__]
    version = str(getattr(sys.modules.get(patch.engine), "__version__", "unknown"))
    try:
        problem = patch.apply(module)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem == "skipped":
        return False
    if problem:
        logger.warning(
            "prefixgate hook: %s %s does not match the supported internals (%s); evictions from %s are not reported",
            patch.engine,
            version,
            problem,
            module.__name__,
        )
        return False
    tested = version.startswith(patch.tested)
    logger.log(
        logging.INFO if tested else logging.WARNING,
        "prefixgate hook: patched %s (%s %s%s)",
        module.__name__,
        patch.engine,
        version,
        "" if tested else f"; untested, tested with {'/'.join(patch.tested)}*",
    )
    return True


# Plain classes, not importlib.abc subclasses: importing importlib.abc costs ~20 ms at every engine start.
class _PatchingLoader:
    def __init__(self, loader: Any, spec: importlib.machinery.ModuleSpec, patches: Mapping[str, Patch]) -> None:
        self._loader, self._spec, self._patches = loader, spec, patches

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        module: types.ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # Put the real loader back first: inspect/linecache and reloads must not see this wrapper.
        self._spec.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        patch_module(module, self._patches)


class PatchingFinder:
    """Finds nothing itself: for the engine modules in ``patches`` it wraps the real loader to patch after exec."""

    def __init__(self, patches: Mapping[str, Patch]) -> None:
        self.patches = patches

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: importlib.machinery.ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, spec, self.patches)  # type: ignore[assignment]  # a duck-typed Loader
                return spec
        return None
