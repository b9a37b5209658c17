"""Build (once, cached) the virtual environment that holds the real vLLM and SGLang prefix-cache classes.

Run as ``python -m tests.enginehooks.enginesvenv --cache-dir ~/.cache/prefixgate`` (``make engines-venv``).
The venv ends up at ``<cache-dir>/engines-venv`` and its path is the last line on stdout; progress goes to
stderr. A second run finds the venv stamped with the hash of ``engines-venv.lock`` and returns at once; a
changed lock rebuilds it next to the old one and swaps it in, so a half-built venv is never used.

Every package is pinned exactly in ``engines-venv.lock`` and installed with ``--no-deps`` in one pip call:
the engines' own metadata pins CUDA builds of torch and GPU-only packages (flashinfer, triton, ...) that the
cache classes never touch, and letting pip resolve them would pull gigabytes of CUDA wheels. torch is the
CPU build (``torch==2.13.0+cpu``: a local wheel on our machines; elsewhere pass ``--torch-index-url
https://download.pytorch.org/whl/cpu``). ``PREFIXGATE_ENGINES_VENV``, when set, names an existing venv and
skips all of this.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "LOCK_FILE",
    "build_engines_venv",
    "default_venv_path",
    "find_engines_venv",
    "lock_digest",
    "main",
]

ENV_VAR = "PREFIXGATE_ENGINES_VENV"
LOCK_FILE = Path(__file__).with_name("engines-venv.lock")
_VENV_NAME = "engines-venv"


def lock_digest(lock_file: Path = LOCK_FILE) -> str:
    return hashlib.sha256(lock_file.read_bytes()).hexdigest()[:16]


def default_venv_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir or Path.home() / ".cache" / "prefixgate") / _VENV_NAME


def _stamp(venv: Path, digest: str) -> Path:
    return venv / f".prefixgate-lock-{digest}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def find_engines_venv(cache_dir: Path | None = None) -> Path | None:
    """The venv named by ``PREFIXGATE_ENGINES_VENV``, else the cached one if built from the current lock."""
    named = os.environ.get(ENV_VAR)
    if named:
        return Path(named)
    venv = default_venv_path(cache_dir)
    return venv if _stamp(venv, lock_digest()).exists() and _python(venv).exists() else None


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: Sequence[str | os.PathLike[str]]) -> None:
    print("+ " + " ".join(map(str, command)), file=sys.stderr, flush=True)
    subprocess.run(list(map(str, command)), check=True, stdout=sys.stderr)


def build_engines_venv(cache_dir: Path | None = None, *, torch_index_url: str | None = None) -> Path:
    """Return the cached engines venv, building it first when it is missing or built from another lock."""
    venv = default_venv_path(cache_dir)
    digest = lock_digest()
    with _exclusive(venv.with_name(_VENV_NAME + ".build-lock")):
        if _stamp(venv, digest).exists():
            return venv
        started = time.monotonic()
        staging = venv.with_name(f"{_VENV_NAME}.building")
        shutil.rmtree(staging, ignore_errors=True)
        _run([sys.executable, "-m", "venv", staging])
        pip = [_python(staging), "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
        if torch_index_url:
            pip += ["--extra-index-url", torch_index_url]
        _run([*pip, "-r", LOCK_FILE])
        _stamp(staging, digest).touch()
        retired = venv.with_name(f"{_VENV_NAME}.old")
        shutil.rmtree(retired, ignore_errors=True)
        if venv.exists():
            venv.rename(retired)
        staging.rename(venv)
        shutil.rmtree(retired, ignore_errors=True)
        print(f"engines venv built in {time.monotonic() - started:.0f} s: {venv}", file=sys.stderr)
    return venv


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.enginehooks.enginesvenv", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/prefixgate")
    parser.add_argument("--torch-index-url", default=None, help="extra index that serves torch==2.13.0+cpu")
    args = parser.parse_args(argv)
    named = os.environ.get(ENV_VAR)
    if named:
        print(named)
        return 0
    try:
        venv = build_engines_venv(args.cache_dir, torch_index_url=args.torch_index_url)
    except subprocess.CalledProcessError as exc:
        print(f"engines venv build failed: {exc}", file=sys.stderr)
        return 1
    print(venv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
