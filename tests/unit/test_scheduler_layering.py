"""The scheduler is framework-free: importing it pulls in neither litestar, httpx nor the gateway."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_scheduler_pulls_in_no_framework() -> None:
    code = (
        "import scheduler, scheduler.blocks, scheduler.ids, scheduler.order, scheduler.trie, scheduler.index, "
        "scheduler.batch, scheduler.dedup; import sys; "
        "bad = [m for m in ('litestar', 'httpx', 'gateway', 'engines') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_package_exports_are_explicit() -> None:
    import scheduler

    assert scheduler.__all__
    for name in scheduler.__all__:
        assert hasattr(scheduler, name), name
