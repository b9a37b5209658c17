"""``prefixgate install-hook``: put the eviction hook's ``.pth`` into an interpreter's site-packages, or take it out.

Two forms:

- default: ``prefixgate_hooks.pth`` (the file shipped next to this module) in the purelib of the interpreter
  running prefixgate. It loads ``engines.hooks.hook`` from the installed prefixgate, for an engine that runs in
  prefixgate's environment. A wheel built with the ``.pth`` at its top level installs the same file itself.
- ``--standalone``: the single file ``engines/hooks/hook.py`` copied as ``prefixgate_hook.py`` plus
  ``prefixgate_hook.pth``, for an engine environment that must not take prefixgate's dependencies (the hook
  is stdlib only). ``--target-python /path/to/engine/bin/python`` installs into that interpreter's
  site-packages by running the file there (``python hook.py --install``). That is also the one command to use
  on a machine that only has the copied file.

Both ``.pth`` lines do nothing unless ``PREFIXGATE_INDEX_URL`` or ``CONTEXTPILOT_INDEX_URL`` is set in the
process. ``--remove`` deletes every file either form wrote in the target site-packages.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from engines.hooks import hook

__all__ = ["PACKAGE_PTH_NAME", "add_arguments", "install_hook", "main", "remove_hook"]

PACKAGE_PTH_NAME = "prefixgate_hooks.pth"
_PACKAGE_MODULE = "engines.hooks.hook"


def _purelib(site_dir: Path | None) -> Path:
    return site_dir if site_dir is not None else Path(sysconfig.get_paths()["purelib"])


def install_hook(*, standalone: bool = False, site_dir: Path | None = None) -> list[Path]:
    """Install into ``site_dir`` (default: this interpreter's purelib); returns the files written."""
    target = _purelib(site_dir)
    if standalone:
        return hook.install_standalone(target)
    target.mkdir(parents=True, exist_ok=True)
    pth = target / PACKAGE_PTH_NAME
    pth.write_text(hook.pth_line(_PACKAGE_MODULE))
    return [pth]


def remove_hook(*, site_dir: Path | None = None) -> list[Path]:
    """Remove both forms from ``site_dir``; returns the files that existed."""
    target = _purelib(site_dir)
    removed = hook.remove_standalone(target)
    pth = target / PACKAGE_PTH_NAME
    if pth.exists():
        pth.unlink()
        removed.append(pth)
    return removed


def _run_in(python: str, remove: bool, site_dir: Path | None) -> int:
    command = [python, str(Path(hook.__file__).resolve()), "--remove" if remove else "--install"]
    if site_dir is not None:
        command += ["--site-dir", str(site_dir)]
    return subprocess.run(command, check=False).returncode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--remove", action="store_true", help="remove the hook instead of installing it")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="install the single stdlib-only file (prefixgate_hook.py) instead of loading prefixgate's package",
    )
    parser.add_argument(
        "--target-python",
        metavar="PATH",
        help="the engine's interpreter: install into its site-packages (implies --standalone)",
    )
    parser.add_argument("--site-dir", type=Path, metavar="DIR", help="install into DIR instead of site-packages")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefixgate install-hook", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.target_python:
        return _run_in(args.target_python, args.remove, args.site_dir)
    if args.remove:
        paths = remove_hook(site_dir=args.site_dir)
        print("\n".join(f"removed {p}" for p in paths) if paths else "nothing to remove")
        return 0
    for path in install_hook(standalone=args.standalone, site_dir=args.site_dir):
        print(f"installed {path}")
    print(
        "The hook is active in processes started with PREFIXGATE_INDEX_URL=http://<gateway>:<port> "
        "(and PREFIXGATE_ADMIN_TOKEN if the gateway requires one)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
