"""The reference system, ContextPilot 0.5.0 itself, driven from the benchmarks in its own venv.

The venv is built once under ``~/.cache/prefixgate/contextpilot-0.5.0-venv`` (``python -m venv``, then the
pinned wheel with ``--no-deps`` plus the only packages its index and scheduler import: numpy and scipy; the
rest of its requirements, the web server, retrievers and model libraries, are never imported by
``contextpilot.server.live_index``). Its code runs in a child process (``bench/reference_child.py``), so none of
it is imported here. Documents are renumbered to small ints for it: it packs ids into int32 arrays.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Reference", "ReferenceUnavailable", "reference_python"]

VERSION = "0.5.0"
REQUIREMENTS = ["numpy==2.4.6", "scipy==1.17.1"]
CACHE = Path(os.environ.get("PREFIXGATE_CACHE", Path.home() / ".cache" / "prefixgate"))
CHILD = Path(__file__).with_name("reference_child.py")


class ReferenceUnavailable(RuntimeError):
    """The reference venv could not be built or ContextPilot could not be imported (the message says why)."""


def reference_python() -> Path:
    """The reference venv's interpreter, building the venv first if needed (minutes, once)."""
    home = CACHE / f"contextpilot-{VERSION}-venv"
    python = home / "bin" / "python"
    stamp = home / ".complete"
    if not stamp.exists():
        print(f"building the ContextPilot {VERSION} venv in {home} (once)...", file=sys.stderr, flush=True)
        venv.create(home, with_pip=True, clear=True)
        wheel = CACHE / "wheels" / f"contextpilot-{VERSION}-py3-none-any.whl"
        package = str(wheel) if wheel.exists() else f"contextpilot=={VERSION}"
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps", package, *REQUIREMENTS],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise ReferenceUnavailable(f"pip install failed: {done.stderr.strip()[-2000:]}")
        stamp.touch()
    check = subprocess.run(
        [str(python), "-c", "import contextpilot.server.live_index"], capture_output=True, text=True, check=False
    )
    if check.returncode:
        raise ReferenceUnavailable(f"import contextpilot.server.live_index failed: {check.stderr.strip()[-2000:]}")
    return python


class Reference:
    """One ContextPilot process: stateless batch plans and a live index for online ``/reorder`` calls."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [str(reference_python()), str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._dense: dict[int, int] = {}
        self._sparse: list[int] = []

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def batch(self, contexts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
        """Stateless ``/reorder``: (reordered contexts in execution order, their input positions)."""
        reply = self._call({"op": "batch", "contexts": [self._to_dense(context) for context in contexts]})
        return [self._to_sparse(context) for context in reply["reordered"]], list(reply["order"])

    def reset(self) -> None:
        self._call({"op": "reset"})

    def online(self, context: Sequence[int]) -> tuple[list[int], str]:
        """Stateful ``/reorder`` of one context: (its new order, its request id)."""
        reply = self._call({"op": "online", "context": self._to_dense(context)})
        return self._to_sparse(reply["reordered"]), str(reply["request_id"])

    def evict(self, request_ids: Sequence[str]) -> None:
        self._call({"op": "evict", "request_ids": list(request_ids)})

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise ReferenceUnavailable(f"the ContextPilot process exited ({self._process.wait()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _to_dense(self, context: Sequence[int]) -> list[int]:
        dense = self._dense
        out = []
        for doc in context:
            number = dense.get(doc)
            if number is None:
                number = dense[doc] = len(self._sparse)
                self._sparse.append(doc)
            out.append(number)
        return out

    def _to_sparse(self, context: Sequence[int]) -> list[int]:
        return [self._sparse[number] for number in context]
