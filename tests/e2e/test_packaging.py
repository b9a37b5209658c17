"""The wheel as ``pip install prefixgate`` builds it: no setuptools deprecations, typed, the hook's two ways in.

Builds the wheel once with pip's build isolation (fetching setuptools from the index, as any install does).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[zipfile.ZipFile, str]:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=280,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (wheel,) = out.glob("prefixgate-*.whl")
    return zipfile.ZipFile(wheel), build.stdout + build.stderr


def test_the_build_raises_no_deprecation_warnings(built: tuple[zipfile.ZipFile, str]) -> None:
    _, log = built
    noisy = [line for line in log.splitlines() if "deprecat" in line.lower() or "BuildBackendWarning" in line]
    assert not noisy, noisy


def test_the_wheel_is_typed_and_ships_both_ways_into_an_engine(built: tuple[zipfile.ZipFile, str]) -> None:
    wheel, _ = built
    names = set(wheel.namelist())
    assert {"gateway/py.typed", "scheduler/py.typed", "engines/py.typed"} <= names
    assert "prefixgate_hooks.pth" in names  # the fallback, at the top of site-packages
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[vllm.general_plugins]\nprefixgate = engines.hooks:vllm_plugin" in text
    assert "engines/hooks/__main__.py" in names and "engines/hooks/hook.py" not in names
