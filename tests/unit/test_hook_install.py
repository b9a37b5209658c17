"""``prefixgate install-hook``: the ``.pth`` really lands in a venv's site-packages and activates a fresh interpreter.

One throwaway venv (``python -m venv --without-pip``, about a second) is shared by the module's tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engines import hooks
from engines.hooks.install import PACKAGE_PTH_NAME, install_hook, main, pth_line, remove_hook

REPO = Path(__file__).resolve().parents[2]
HOOK_DIR = REPO / "engines" / "hooks"
_PROBE = "import sys; print(sorted(m for m in sys.modules if m.startswith(('engines', 'prefixgate_hook'))))"


@dataclass
class Venv:
    python: Path
    purelib: Path

    def run(self, code: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFIXGATE_", "CONTEXTPILOT_", "PYTHON"))}
        return subprocess.run(
            [str(self.python), "-c", code],
            env={**clean, **(env or {})},
            cwd=self.python.parent,  # not the repository: its prefixgate.egg-info would be on sys.path too
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    root = tmp_path_factory.mktemp("engine-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    yield Venv(python, Path(purelib))


@pytest.fixture
def clean(venv: Venv) -> Iterator[Venv]:
    yield venv
    remove_hook(site_dir=venv.purelib)


def test_standalone_pth_activates_a_fresh_interpreter(clean: Venv) -> None:
    written = install_hook(standalone=True, site_dir=clean.purelib)
    assert clean.purelib / "prefixgate_hook.pth" in written
    assert {p.name for p in (clean.purelib / "prefixgate_hook").iterdir()} == {p.name for p in HOOK_DIR.glob("*.py")}
    child = clean.run(
        "import sys; import prefixgate_hook as h; "
        "print(h.active() is not None, any(type(f).__name__ == 'PatchingFinder' for f in sys.meta_path))",
        env={"PREFIXGATE_INDEX_URL": "http://127.0.0.1:9"},
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["True", "True"]


def test_without_the_env_var_the_pth_imports_nothing(clean: Venv) -> None:
    install_hook(standalone=True, site_dir=clean.purelib)
    child = clean.run(_PROBE)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[]"


def test_package_pth_loads_the_installed_prefixgate(clean: Venv) -> None:
    install_hook(site_dir=clean.purelib)
    assert (clean.purelib / PACKAGE_PTH_NAME).read_text() == pth_line("engines.hooks")
    on = clean.run(_PROBE, env={"CONTEXTPILOT_INDEX_URL": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)})
    assert on.returncode == 0, on.stderr
    assert "'engines.hooks'" in on.stdout
    # activation pulls in nothing of the gateway (the engine's process stays lean)
    heavy = clean.run(
        "import sys; print([m for m in ('msgspec', 'httpx', 'litestar', 'gateway', 'scheduler') if m in sys.modules])",
        env={"PREFIXGATE_INDEX_URL": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)},
    )
    assert heavy.stdout.strip() == "[]", heavy.stderr
    off = clean.run(_PROBE, env={"PYTHONPATH": str(REPO)})
    assert off.stdout.strip() == "[]", off.stderr


def test_mismatched_engine_internals_warn_and_never_crash(clean: Venv, tmp_path: Path) -> None:
    install_hook(standalone=True, site_dir=clean.purelib)
    fake = tmp_path / "vllm" / "v1" / "core"
    fake.mkdir(parents=True)
    for package in (tmp_path / "vllm", tmp_path / "vllm" / "v1", fake):
        (package / "__init__.py").write_text("__version__ = '9.9.9'\n" if package.name == "vllm" else "")
    (fake / "block_pool.py").write_text("class BlockPool:\n    def get_new_blocks(self, n):\n        return []\n")
    child = clean.run(
        "import vllm.v1.core.block_pool as m; print(m.BlockPool().get_new_blocks(1))",
        env={"PREFIXGATE_INDEX_URL": "http://127.0.0.1:9", "PYTHONPATH": str(tmp_path)},
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[]"
    assert "vllm 9.9.9 does not match the supported internals (BlockPool lacks evict_blocks" in child.stderr


def test_target_python_installs_and_removes_in_that_interpreter(clean: Venv) -> None:
    assert main(["--target-python", str(clean.python)]) == 0
    for source in HOOK_DIR.glob("*.py"):
        assert (clean.purelib / "prefixgate_hook" / source.name).read_bytes() == source.read_bytes()
    assert (clean.purelib / "prefixgate_hook.pth").exists()
    assert main(["--remove", "--target-python", str(clean.python)]) == 0
    assert not list(clean.purelib.glob("prefixgate_hook*"))


def test_remove_takes_out_both_forms(tmp_path: Path) -> None:
    install_hook(site_dir=tmp_path)
    install_hook(standalone=True, site_dir=tmp_path)
    (tmp_path / "prefixgate_hook.py").write_text("# what versions before the package installed\n")
    removed = {p.name for p in remove_hook(site_dir=tmp_path)}
    assert removed == {
        "prefixgate_hooks.pth", "prefixgate_hook.pth", "prefixgate_hook", "prefixgate_hook.py",
        "prefixgate_hook-0.1.0.dist-info",
    }  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    assert remove_hook(site_dir=tmp_path) == []


def test_the_pth_line_costs_about_a_microsecond_when_off() -> None:
    code = compile(pth_line("prefixgate_hook"), "prefixgate_hook.pth", "exec")
    env = {k: v for k, v in os.environ.items() if k not in hooks.INDEX_URL_VARS}
    namespace: dict[str, object] = {}
    runs = 10_000
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        started = time.thread_time()  # CPU time of this thread: a busy machine does not preempt it into failing
        for _ in range(runs):
            exec(code, namespace)
        per_run = (time.thread_time() - started) / runs
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert per_run < 20e-6, f"{per_run * 1e6:.1f} us per interpreter start"


def test_the_package_is_self_contained() -> None:
    for module in HOOK_DIR.glob("*.py"):
        imports = [
            line.strip() for line in module.read_text().splitlines() if line.lstrip().startswith(("import ", "from "))
        ]
        foreign = [line for line in imports if "engines" in line or "prefixgate" in line or "gateway" in line]
        assert not foreign, (module.name, foreign)
        absolute = {line.split()[1].split(".")[0] for line in imports if not line.startswith("from .")}
        assert absolute <= sys.stdlib_module_names | {"__future__"}, (module.name, absolute - sys.stdlib_module_names)
    assert max(len(m.read_text().splitlines()) for m in HOOK_DIR.glob("*.py")) < 400
    # run as a folder, with nothing of prefixgate importable (-I: no PYTHONPATH, no user site, no cwd)
    child = subprocess.run(
        [sys.executable, "-I", str(HOOK_DIR), "--help"], capture_output=True, text=True, check=False, cwd="/"
    )
    assert child.returncode == 0 and "--install" in child.stdout, child.stderr


def test_the_plugin_entry_point_alone_activates_the_hook(clean: Venv) -> None:
    """What vLLM's ``load_general_plugins`` does, without vLLM: the entry point is found, loaded and called."""
    written = install_hook(standalone=True, site_dir=clean.purelib, pth=False)
    assert not (clean.purelib / "prefixgate_hook.pth").exists() and written
    code = textwrap.dedent("""
        import sys
        from importlib.metadata import entry_points
        assert "prefixgate_hook" not in sys.modules
        (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "prefixgate"]
        plugin.load()()
        import prefixgate_hook
        print(plugin.value, prefixgate_hook.active() is not None)
    """)
    on = clean.run(code, env={"PREFIXGATE_INDEX_URL": "http://127.0.0.1:9"})
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["prefixgate_hook:vllm_plugin", "True"]
    off = clean.run(code)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["prefixgate_hook:vllm_plugin", "False"]


def test_prefixgate_own_metadata_carries_the_plugin_entry_point() -> None:
    from importlib.metadata import entry_points

    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "prefixgate"]
    assert plugin.value == "engines.hooks:vllm_plugin" and plugin.load() is hooks.vllm_plugin


def test_the_shipped_pth_is_the_one_install_hook_writes(tmp_path: Path) -> None:
    shipped = (HOOK_DIR / PACKAGE_PTH_NAME).read_text()
    install_hook(site_dir=tmp_path)
    assert (tmp_path / PACKAGE_PTH_NAME).read_text() == shipped
