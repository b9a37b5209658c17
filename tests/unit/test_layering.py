"""Layering: the scheduler is framework-free, and the gateway's folders import only the layers below them."""

import ast
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


# The gateway's folders, bottom to top: each may import only those before it (and ``scheduler``, ``engines``).
# ``base`` is the gateway's own top-level modules except the composition root (``app``, ``cli``), which may import
# anything; ``client`` imports nothing of the gateway at all.
LAYERS = ["base", "wire", "edge", "planning", "upstream", "state", "indexapi", "proxy"]
ROOT_MODULES = {"app", "cli"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (ROOT / "gateway" / parts[-1]).is_dir():
        return parts[1]
    return "root" if parts[-1] in ROOT_MODULES else "base"


def _imports(path: Path) -> set[str]:
    """The gateway modules a file imports at run time (imports under ``if TYPE_CHECKING:`` are annotations only)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("gateway.")}


def _allowed(layer: str, target: str) -> bool:
    if layer == "root" or target == layer:
        return True
    if layer == "client" or target == "root":
        return False
    return target == "client" or LAYERS.index(target) < LAYERS.index(layer)


def test_gateway_folders_import_only_the_layers_below() -> None:
    wrong = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "gateway":
            continue
        layer = _layer(module)
        wrong += [
            f"{module} ({layer}) imports {name} ({_layer(name)})"
            for name in sorted(_imports(path))
            if not _allowed(layer, _layer(name))
        ]
    assert not wrong, "\n".join(wrong)


def test_every_layer_says_what_it_owns_and_may_import() -> None:
    for folder in sorted(p for p in (ROOT / "gateway").iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        assert "Owns" in doc, folder.name
        assert "import" in doc, folder.name
        assert _layer(f"gateway.{folder.name}.x") in [*LAYERS, "client"], folder.name


def test_the_client_runs_without_the_server() -> None:
    code = (
        "import gateway.client, gateway.client.batch; import sys; "
        "bad = [m for m in sys.modules if m.startswith('gateway.') and not m.startswith('gateway.client')"
        " or m in ('litestar', 'uvicorn')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
