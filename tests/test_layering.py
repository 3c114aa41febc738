"""The dependency rule (DESIGN.md): producer/ and worker/ depend on schema/ and never on each other,
except the CLI, the composition root that nothing imports; and importing any package has no side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSITION_ROOT = {"producer/cli.py"}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere in it (functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(("package", "forbidden"), [
    ("producer", {"worker"}), ("worker", {"producer"}), ("schema", {"producer", "worker"}),
])
def test_packages_import_only_what_the_rule_allows(package: str, forbidden: set[str]) -> None:
    offenders = {str(path.relative_to(REPO)): sorted(imported_packages(path) & forbidden)
                 for path in sorted((REPO / package).rglob("*.py"))
                 if str(path.relative_to(REPO)) not in COMPOSITION_ROOT}
    assert not {path: names for path, names in offenders.items() if names}


def test_nothing_imports_the_cli() -> None:
    importers = [str(path.relative_to(REPO)) for package in ("producer", "worker", "schema")
                 for path in (REPO / package).rglob("*.py")
                 if "producer.cli" in path.read_text() and str(path.relative_to(REPO)) not in COMPOSITION_ROOT]
    assert importers == []


def test_importing_writes_nothing_and_loads_no_other_side(tmp_path: Path) -> None:
    """Every module of each package, imported in a fresh interpreter in an empty folder with an empty
    HOME: no file appears, and the producer's modules load nothing of the worker's (and back)."""
    script = """
import importlib, pkgutil, sys
for package in ("schema", "producer", "worker"):
    side = {"producer": "worker", "worker": "producer"}.get(package)
    before = set(sys.modules)
    root = importlib.import_module(package)
    for module in pkgutil.walk_packages(root.__path__, package + "."):
        if module.name not in ("producer.cli",) and ".migrations" not in module.name:
            importlib.import_module(module.name)
    loaded = {m for m in set(sys.modules) - before if side and m.split(".")[0] == side}
    assert not loaded, f"importing {package} loaded {sorted(loaded)}"
    for name in [m for m in sys.modules if m.split(".")[0] in ("schema", "producer", "worker")]:
        del sys.modules[name]
"""
    home = tmp_path / "home"
    home.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {"HOME": str(home), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p not in (home, workdir)]
    assert written == []
