"""Build the real `llama-server` once and cache it, keyed by the llama-cpp-python sdist version.

Run as `python -m tests.builds.llamacpp --cache-dir ~/.cache/prefixgate` (`make llama-server`).
The binary ends up at `<cache-dir>/llama-server-<version>/llama-server` and its path is the last
line on stdout; progress goes to stderr. A second run finds the cached binary and returns at once.

The C++ tree is the one vendored in the `llama-cpp-python` sdist (it carries `tools/server`), so
one pinned PyPI artifact names the llama.cpp revision we test against. Only the server target is
built (about 6 minutes on 2 cores), without the web UI, OpenSSL or `-march=native`, so the cached
binary runs on any x86-64 runner and the build never touches the network after the download.
`PREFIXGATE_LLAMA_SERVER`, when set, names an existing binary and skips all of this.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

__all__ = [
    "CMAKE_FLAGS",
    "ENV_VAR",
    "LLAMA_CPP_PYTHON_VERSION",
    "BuildError",
    "build_llama_server",
    "cached_binary_path",
    "default_cache_dir",
    "find_llama_server",
    "main",
]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
ENV_VAR = "PREFIXGATE_LLAMA_SERVER"
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # Both UI switches off: the prebuilt-UI default downloads web assets at build time.
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    # The cached binary may move between CI runners with different CPUs.
    "-DGGML_NATIVE=OFF",
)
_BINARY_NAME = "llama-server"
_PIP_DOWNLOAD = (sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-input")
_HEARTBEAT_S = 20.0
_PROGRESS = re.compile(r"^\[\s*\d+%\]")


class BuildError(RuntimeError):
    """The toolchain is missing or a build step failed; the message says which and what to do."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "prefixgate"


def cached_binary_path(cache_dir: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the build for `version` puts the binary (it may not exist yet)."""
    return (cache_dir or default_cache_dir()) / f"llama-server-{version}" / _BINARY_NAME


def find_llama_server(cache_dir: Path | None = None) -> Path | None:
    """The binary named by `PREFIXGATE_LLAMA_SERVER`, else the cached build if it runs, else None."""
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        path = Path(from_env).expanduser()
        return path if _is_executable(path) else None
    cached = cached_binary_path(cache_dir)
    return cached if _runs(cached) else None


def build_llama_server(
    cache_dir: Path | None = None,
    *,
    jobs: int | None = None,
    log: TextIO | None = None,
) -> Path:
    """Return the cached binary, building it first if needed. Concurrent callers build it once."""
    out = log if log is not None else sys.stderr
    cache_dir = (cache_dir or default_cache_dir()).expanduser().resolve()
    target = cached_binary_path(cache_dir)
    if _runs(target):
        return target
    _check_toolchain()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}.lock", out):
        if _runs(target):  # another process finished the build while we waited
            return target
        _remove_stale_workdirs(cache_dir)
        work = Path(tempfile.mkdtemp(prefix=f"llama-build-{LLAMA_CPP_PYTHON_VERSION}-", dir=cache_dir))
        try:
            built = _build_in(
                work, jobs or _cpu_count(), cache_dir / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}.log", out
            )
            _install(built, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _build_in(work: Path, jobs: int, log_path: Path, out: TextIO) -> Path:
    started = time.monotonic()

    def step(message: str) -> None:
        print(f"[llama-server {time.monotonic() - started:6.1f}s] {message}", file=out, flush=True)

    step(f"downloading the llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist into {work}")
    with log_path.open("w", encoding="utf-8") as log_file:
        _run(
            [*_PIP_DOWNLOAD, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(work / "dist")],
            log_file,
            log_path,
            "pip download",
        )
        step("extracting vendor/llama.cpp")
        source = _extract_llama_cpp(work)
        step("configuring with cmake")
        build_dir = work / "build"
        _run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS], log_file, log_path, "cmake configure")
        step(f"building the {_BINARY_NAME} target with -j {jobs} (about 6 minutes on 2 cores)")
        _run(
            ["cmake", "--build", str(build_dir), "--target", _BINARY_NAME, "-j", str(jobs)],
            log_file,
            log_path,
            "cmake build",
            progress=step,
        )
    binary = build_dir / "bin" / _BINARY_NAME
    if not binary.is_file():
        raise BuildError(f"the build finished but {binary} is missing; see {log_path}")
    step(f"built {binary.stat().st_size / 1e6:.1f} MB binary")
    return binary


def _run(
    cmd: list[str],
    log_file: TextIO,
    log_path: Path,
    what: str,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Run `cmd` with its output in the log; echo cmake's `[ nn%]` lines and a heartbeat when quiet."""
    print(f"$ {' '.join(cmd)}", file=log_file, flush=True)
    tail: deque[str] = deque(maxlen=40)
    last_output = [time.monotonic()]
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(_HEARTBEAT_S):
            if progress is not None and time.monotonic() - last_output[0] >= _HEARTBEAT_S:
                progress("still compiling ...")

    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace"
    ) as proc:
        ticker = threading.Thread(target=heartbeat, name="llama-build-heartbeat", daemon=True)
        ticker.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                tail.append(line.rstrip())
                if progress is not None and _PROGRESS.match(line):
                    last_output[0] = time.monotonic()
                    progress(line.rstrip())
            code = proc.wait()
        finally:
            done.set()
            ticker.join()
    log_file.flush()
    if code != 0:
        shown = "\n".join(f"    {line}" for line in tail)
        raise BuildError(f"{what} failed with exit status {code}; last output:\n{shown}\nfull log: {log_path}")


def _extract_llama_cpp(work: Path) -> Path:
    archives = sorted((work / "dist").glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise BuildError(f"pip download produced no llama_cpp_python sdist in {work / 'dist'}")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise BuildError(f"{archives[0].name} has no {prefix} tree")
        tar.extractall(work / "src", members=members, filter="data")
    archives[0].unlink()  # 77 MB we no longer need
    return work / "src" / prefix


def _install(built: Path, target: Path) -> None:
    """Copy next to the target, check that it runs, then rename: readers never see a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(built, staging)
        staging.chmod(0o755)
        if not _runs(staging):
            raise BuildError(f"the freshly built {built} does not run `--version`")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path, out: TextIO) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[llama-server] another build holds {path}; waiting for it", file=out, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_workdirs(cache_dir: Path) -> None:
    # Only called under the lock, so these belong to builds that were killed midway.
    for stale in cache_dir.glob(f"llama-build-{LLAMA_CPP_PYTHON_VERSION}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _check_toolchain() -> None:
    missing = [tool for tool in ("cmake", "make") if shutil.which(tool) is None]
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if cxx):
        missing.append("a C++ compiler (g++ or clang++)")
    if missing:
        raise BuildError(
            f"cannot build llama-server: missing {', '.join(missing)}. "
            "Install them (Debian/Ubuntu: apt-get install cmake make g++) "
            f"or point {ENV_VAR} at an existing llama-server binary."
        )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _runs(path: Path) -> bool:
    if not _is_executable(path):
        return False
    try:
        result = subprocess.run([str(path), "--version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.builds.llamacpp", description="Build and cache llama-server."
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: nproc)")
    args = parser.parse_args(argv)

    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        path = Path(from_env).expanduser()
        if not _is_executable(path):
            print(f"error: {ENV_VAR}={from_env} is not an executable file", file=sys.stderr)
            return 2
        print(path)
        return 0
    try:
        binary = build_llama_server(args.cache_dir, jobs=args.jobs)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
