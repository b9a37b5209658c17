"""The reference proxy for side-by-side benchmarks: ContextPilot 0.5.0's own HTTP server, in its own venv.

``ensure_venv`` builds (once) a virtual environment under the cache directory with the ``contextpilot`` 0.5.0 wheel
(installed without its dependency list, which pulls in transformers, elasticsearch and datasets the server does not
need) plus what ``contextpilot.server.http_server`` imports and runs with: FastAPI, uvicorn with its standard extras
(uvloop, httptools, as ``uvicorn[standard]`` in its requirements), aiohttp, numpy and scipy. ``command`` is the
launch line its README documents (``python -m contextpilot.server.http_server``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["REFERENCE", "command", "ensure_venv"]

REFERENCE = "contextpilot==0.5.0"
# Pinned to the versions measured; the server imports nothing else (transformers is optional and only warns).
_SERVER_DEPS = [
    "fastapi==0.165.0",
    "uvicorn[standard]==0.55.0",
    "aiohttp==3.14.5",
    "numpy==2.4.6",
    "scipy==1.17.1",
]


def _venv_dir() -> Path:
    cache = Path.home() / ".cache" / "prefixgate"  # the Makefile's CACHE_DIR
    # not "contextpilot-0.5.0-venv": the scheduler comparison builds that one with other packages
    return cache / "contextpilot-server-venv"


def ensure_venv() -> Path:
    """The reference venv's python, building the venv first when it is missing or incomplete (a few minutes)."""
    venv = _venv_dir()
    python = venv / "bin" / "python"
    stamp = venv / ".ready"
    if stamp.exists():
        return python
    print(f"building the reference venv in {venv} (once; a few minutes)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", REFERENCE], check=True)
    subprocess.run([*pip, *_SERVER_DEPS], check=True)
    subprocess.run([str(python), "-c", "import contextpilot.server.http_server"], check=True, capture_output=True)
    stamp.touch()
    return python


def command(python: Path, port: int, upstream: str) -> list[str]:
    """Launch the reference server in front of ``upstream`` (live mode, as documented; warnings only in its log)."""
    return [
        str(python),
        "-m",
        "contextpilot.server.http_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--infer-api-url",
        upstream,
        "--log-level",
        "warning",
    ]
