"""The layout's rules, checked over the source: module sizes and private names.

A module has one job and reads in one sitting; when it grows a second job it becomes
two modules. No module imports another module's private (underscore) name: if two
modules need it, it is public in one of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "corral"
PACKAGES_AT_MOST_450 = ("runtime", "engine", "server")
AT_MOST = 700
STANDARD_PRIVATE = frozenset({"os._exit", "sys._getframe"})  # public API, private names


def _modules() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_module_outgrows_one_job(path: Path) -> None:
    package = path.relative_to(SOURCE).parts[0]
    limit = 450 if package in PACKAGES_AT_MOST_450 else AT_MOST
    assert _lines(path) <= limit, f"{path.relative_to(SOURCE)}: {_lines(path)} lines > {limit}"


def _defined_here(tree: ast.Module) -> set[str]:
    """Private names a module defines itself: its functions, classes, and attributes
    (assigned on any object, or declared in a class body)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    own = _defined_here(tree)
    found = [f"{ast.unparse(node)}" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr.startswith("_")
             and not node.attr.startswith("__") and node.attr not in own
             and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
             and ast.unparse(node) not in STANDARD_PRIVATE]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("corral"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name) \
                and node.value.id in _imported_modules(tree):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def _imported_modules(tree: ast.Module) -> set[str]:
    """Names bound to corral modules by `import corral.x as y` or `from corral import x`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names
                         if a.name.startswith("corral"))
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "corral" or node.module.startswith("corral.")):
            names.update(a.asname or a.name for a in node.names
                         if (SOURCE / node.module.removeprefix("corral").lstrip(".")
                             .replace(".", "/") / a.name).with_suffix(".py").exists()
                         or (SOURCE / node.module.removeprefix("corral").lstrip(".")
                             .replace(".", "/") / a.name).is_dir())
    return names


@pytest.mark.parametrize("path", [*_modules(), *sorted(SOURCE.parent.parent.joinpath(
    "tests").glob("*.py"))], ids=lambda p: p.name)
def test_no_private_name_crosses_a_module_boundary(path: Path) -> None:
    """Imported private names, and private attributes of objects that this module does
    not define (another module's internals)."""
    assert _private_imports(path) == []


def test_the_runtime_and_its_servers_import_no_mlx() -> None:
    """MLX loads in the engines only (a worker process, under process isolation): the
    supervising process imports it for a request that needs it (tools), never at
    import time."""
    import subprocess
    import sys

    probe = ("import sys, corral.runtime, corral.server.http, corral.server.jsonrpc; "
             "print(sorted(m for m in ('mlx.core', 'mlx_lm', 'llguidance') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
