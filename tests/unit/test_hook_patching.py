"""The hook's one wrapper shape and its class/instance patching, on plain classes (the real engines: tests/enginehooks)."""

from __future__ import annotations

from typing import Any

import pytest

from engines.hooks.patching import MARK, observe, wrap
from engines.hooks.tracking import CacheState, state_of


class Cache:
    def put(self, key: str, *, size: int = 1) -> str:
        return f"{key}:{size}"

    def fail(self) -> None:
        raise KeyError("engine error")


def test_before_and_after_see_the_call_and_the_result() -> None:
    calls: list[tuple[Any, ...]] = []

    def before(cache: Cache, key: str, *, size: int = 1) -> str:
        calls.append(("before", key, size))
        return "token"

    def after(cache: Cache, seen: str, result: str, key: str, *, size: int = 1) -> None:
        calls.append(("after", seen, result, key, size))

    class Patched(Cache):
        pass

    assert wrap(Patched, {"put": observe(after, before=before)}) is None
    assert Patched().put("k", size=3) == "k:3"
    assert calls == [("before", "k", 3), ("after", "token", "k:3", "k", 3)]
    assert Patched.__dict__[MARK] == ("put",)
    assert wrap(Patched, {"put": observe(after)}) == "skipped"  # a second copy of the hook leaves it alone


def test_hook_failures_never_reach_the_engine(caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("hook bug")

    class Patched(Cache):
        pass

    wrap(Patched, {"put": observe(broken, before=broken)})
    assert Patched().put("k") == "k:1"
    assert Patched().put("k") == "k:1"
    assert [r.getMessage() for r in caplog.records].count(
        "prefixgate hook: broken failed; the engine is unaffected, reports may be missing"
    ) == 1  # logged once per kind, not per call


def test_engine_errors_propagate_and_always_runs_after() -> None:
    seen: list[Any] = []

    class Patched(Cache):
        pass

    wrap(Patched, {"fail": observe(lambda cache, token, result: seen.append((token, result)), before=lambda c: 7,
                                   always=True)})  # fmt: skip
    with pytest.raises(KeyError, match="engine error"):
        Patched().fail()
    assert seen == [(7, None)]


def test_one_instance_can_be_patched_alone() -> None:
    results: list[str] = []
    one, other = Cache(), Cache()
    assert wrap(one, {"put": observe(lambda cache, _seen, result, *_a, **_k: results.append(result))}) is None
    one.put("a")
    other.put("b")
    assert results == ["a:1"]
    assert wrap(one, {"put": observe()}) == "skipped"


def test_per_cache_state_is_typed_and_kept_on_the_instance() -> None:
    one, other = Cache(), Cache()
    state = state_of(one)
    assert isinstance(state, CacheState) and state is state_of(one) and state is not state_of(other)
    assert (state.depth, state.removed, state.host_only) == (0, [], set())
