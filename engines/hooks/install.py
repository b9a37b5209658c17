"""Putting the hook into an engine's interpreter and taking it out: ``prefixgate install-hook``, the standalone form.

Two ways in, both installed by default and both idempotent (the second one to run finds the hook active):

- vLLM's plugin entry point (group ``vllm.general_plugins``, name ``prefixgate``): vLLM calls it in every process
  it starts (API server, engine core, workers) before any work. ``VLLM_PLUGINS`` filters it like any plugin.
- A ``.pth`` line, the fallback: it runs at every interpreter start, checks ``PREFIXGATE_INDEX_URL`` (or
  ``CONTEXTPILOT_INDEX_URL``) itself and imports nothing when neither is set. SGLang has no plugin entry point,
  so it relies on this; so does a vLLM process that never loads plugins.

Two forms:

- package (default): the ``prefixgate_hooks.pth`` shipped next to this module, in the purelib of the interpreter
  running prefixgate; it loads ``engines.hooks`` from the installed prefixgate (whose own metadata carries the
  entry point). A wheel built from this repository installs the same ``.pth`` itself.
- standalone: this package's files copied as the package ``prefixgate_hook`` plus ``prefixgate_hook.pth`` and a
  ``prefixgate_hook-<version>.dist-info`` holding the entry point, for an engine environment that must not take
  prefixgate's dependencies (the hook is stdlib only). ``python engines/hooks --install`` runs it in whatever
  interpreter runs that command; ``prefixgate install-hook --target-python PATH`` does exactly that for you.

``--remove`` deletes every file either form wrote in the target site-packages (and the single-file
``prefixgate_hook.py`` that older versions installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

# argparse, shutil, subprocess and sysconfig are imported where used: activation (the package __init__) only needs
# pth_line and the constants, and runs at every engine start.

__all__ = [
    "INDEX_URL_VARS",
    "PACKAGE_MODULE",
    "PACKAGE_PTH_NAME",
    "PLUGIN_GROUP",
    "PLUGIN_NAME",
    "PTH_NAME",
    "STANDALONE_PACKAGE",
    "add_arguments",
    "install_hook",
    "install_standalone",
    "main",
    "pth_line",
    "remove_hook",
    "remove_standalone",
    "standalone_main",
]

INDEX_URL_VARS = ("PREFIXGATE_INDEX_URL", "CONTEXTPILOT_INDEX_URL")
STANDALONE_PACKAGE = "prefixgate_hook"
PTH_NAME = STANDALONE_PACKAGE + ".pth"
PACKAGE_PTH_NAME = "prefixgate_hooks.pth"
PACKAGE_MODULE = "engines.hooks"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "prefixgate"
VERSION = "0.1.0"
_HERE = Path(__file__).resolve().parent
_LEGACY_FILE = STANDALONE_PACKAGE + ".py"


def pth_line(module: str) -> str:
    """The one ``.pth`` line: reads the environment itself, imports ``module`` only when the hook is on."""
    check = " or ".join(f"os.environ.get({name!r})" for name in INDEX_URL_VARS)
    return f"import os; ({check}) and __import__({module!r}, fromlist=['activate']).activate()\n"


def _purelib(site_dir: Path | None) -> Path:
    import sysconfig

    return site_dir if site_dir is not None else Path(sysconfig.get_paths()["purelib"])


def _dist_info(target: Path) -> Path:
    return target / f"{STANDALONE_PACKAGE}-{VERSION}.dist-info"


def install_standalone(site_dir: Path | None = None, *, pth: bool = True) -> list[Path]:
    """Copy this package as ``prefixgate_hook`` into ``site_dir`` with its entry point and (unless not) its ``.pth``."""
    import shutil

    target = _purelib(site_dir)
    remove_standalone(target)
    package = target / STANDALONE_PACKAGE
    package.mkdir(parents=True)
    written = []
    for source in sorted(_HERE.glob("*.py")):
        shutil.copyfile(source, package / source.name)
        written.append(package / source.name)
    meta = _dist_info(target)
    meta.mkdir()
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: {STANDALONE_PACKAGE}\nVersion: {VERSION}\n"
        "Summary: prefixgate's eviction hook for vLLM and SGLang (stdlib only)\n",
        "entry_points.txt": f"[{PLUGIN_GROUP}]\n{PLUGIN_NAME} = {STANDALONE_PACKAGE}:vllm_plugin\n",
        "INSTALLER": "prefixgate\n",
    }
    if pth:
        (target / PTH_NAME).write_text(pth_line(STANDALONE_PACKAGE))
        written.append(target / PTH_NAME)
    for name, text in files.items():
        (meta / name).write_text(text)
        written.append(meta / name)
    record = [f"{path.relative_to(target).as_posix()},," for path in [*written, meta / "RECORD"]]
    (meta / "RECORD").write_text("\n".join(record) + "\n")
    return [*written, meta / "RECORD"]


def remove_standalone(site_dir: Path | None = None) -> list[Path]:
    """Remove what :func:`install_standalone` (or the older single-file install) wrote; returns what existed."""
    import shutil

    target = _purelib(site_dir)
    removed = []
    for path in (target / PTH_NAME, target / _LEGACY_FILE):
        if path.exists():
            path.unlink()
            removed.append(path)
    for folder in (target / STANDALONE_PACKAGE, *target.glob(f"{STANDALONE_PACKAGE}-*.dist-info")):
        if folder.is_dir():
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def install_hook(*, standalone: bool = False, site_dir: Path | None = None, pth: bool = True) -> list[Path]:
    """Install into ``site_dir`` (default: this interpreter's purelib); returns the files written."""
    target = _purelib(site_dir)
    if standalone:
        return install_standalone(target, pth=pth)
    target.mkdir(parents=True, exist_ok=True)
    path = target / PACKAGE_PTH_NAME
    path.write_text(pth_line(PACKAGE_MODULE))
    return [path]


def remove_hook(*, site_dir: Path | None = None) -> list[Path]:
    """Remove both forms from ``site_dir``; returns the files that existed."""
    target = _purelib(site_dir)
    removed = remove_standalone(target)
    path = target / PACKAGE_PTH_NAME
    if path.exists():
        path.unlink()
        removed.append(path)
    return removed


def _run_in(python: str, remove: bool, site_dir: Path | None, pth: bool) -> int:
    import subprocess

    command = [python, str(_HERE), "--remove" if remove else "--install"]
    if site_dir is not None:
        command += ["--site-dir", str(site_dir)]
    if not pth:
        command.append("--no-pth")
    return subprocess.run(command, check=False).returncode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--remove", action="store_true", help="remove the hook instead of installing it")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="install the stdlib-only package prefixgate_hook instead of loading prefixgate's own",
    )
    parser.add_argument(
        "--target-python",
        metavar="PATH",
        help="the engine's interpreter: install into its site-packages (implies --standalone)",
    )
    parser.add_argument("--site-dir", type=Path, metavar="DIR", help="install into DIR instead of site-packages")
    parser.add_argument(
        "--no-pth",
        action="store_true",
        help="standalone: only vLLM's plugin entry point, no .pth (then SGLang is not instrumented)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``prefixgate install-hook``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="prefixgate install-hook",
        description="Install the engine eviction hook into an interpreter's site-packages, or remove it.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.target_python:
        return _run_in(args.target_python, args.remove, args.site_dir, not args.no_pth)
    if args.remove:
        paths = remove_hook(site_dir=args.site_dir)
        print("\n".join(f"removed {p}" for p in paths) if paths else "nothing to remove")
        return 0
    if args.no_pth and not args.standalone:
        parser.error("--no-pth needs --standalone (prefixgate's own metadata already carries the entry point)")
    for path in install_hook(standalone=args.standalone, site_dir=args.site_dir, pth=not args.no_pth):
        print(f"installed {path}")
    print(
        "The hook is active in processes started with PREFIXGATE_INDEX_URL=http://<gateway>:<port> "
        "(and PREFIXGATE_ADMIN_TOKEN if the gateway requires one)."
    )
    return 0


def standalone_main(argv: Sequence[str] | None = None) -> int:
    """``python <this package's folder> --install|--remove [--site-dir DIR] [--no-pth]``, for that interpreter."""
    import argparse

    parser = argparse.ArgumentParser(description="prefixgate eviction hook for vLLM/SGLang (standalone install)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--install", action="store_true", help="install into this interpreter's site-packages")
    action.add_argument("--remove", action="store_true", help="remove it again")
    parser.add_argument("--site-dir", type=Path, default=None, help="default: sysconfig purelib")
    parser.add_argument("--no-pth", action="store_true", help="only vLLM's plugin entry point, no .pth")
    args = parser.parse_args(argv)
    paths = remove_standalone(args.site_dir) if args.remove else install_standalone(args.site_dir, pth=not args.no_pth)
    verb = "removed" if args.remove else "installed"
    for path in paths:
        print(f"{verb} {path}")
    if not paths:
        print("nothing to remove")
    return 0
