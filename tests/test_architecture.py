"""The layout's rules, checked over the source: module sizes, docstrings, private names
and which package may import which.

A module has one job and reads in one sitting; when it grows a second job it becomes
two modules. Each module starts with a docstring naming that job. No module imports
another module's private (underscore) name: if two modules need it, it is public in one
of them. The packages are layers: `protocol/` is data and codecs and imports only
itself (never `config`); `actors/` (the kernel) and `resilience/` (the toolkit) know
nothing of `runtime/`, `engine/` or `server/`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "corral"
PACKAGES_AT_MOST_450 = ("runtime", "engine", "server")
AT_MOST = 500
STANDARD_PRIVATE = frozenset({"os._exit", "sys._getframe"})  # public API, private names
SERVING = ("corral.runtime", "corral.engine", "corral.server")
PROTOCOL_THIRD_PARTY = frozenset({"msgspec"})


def _modules() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(SOURCE))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, at any depth (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def _in_package(package: str) -> list[Path]:
    return sorted((SOURCE / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_module_outgrows_one_job(path: Path) -> None:
    package = path.relative_to(SOURCE).parts[0]
    limit = 450 if package in PACKAGES_AT_MOST_450 else AT_MOST
    assert _lines(path) <= limit, f"{_name(path)}: {_lines(path)} lines > {limit}"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_every_module_says_what_it_is_for(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and docstring.strip(), f"{_name(path)} has no docstring"


@pytest.mark.parametrize("path", _in_package("protocol"), ids=_name)
def test_protocol_imports_only_protocol(path: Path) -> None:
    """Data and codecs: the protocol itself, the standard library and msgspec, and
    never the configuration."""
    allowed = PROTOCOL_THIRD_PARTY
    wrong = [module for module in _imports(path)
             if not module.startswith("corral.protocol")
             and (module == "corral" or module.startswith("corral.")
                  or module.split(".")[0] not in sys.stdlib_module_names | allowed)]
    assert wrong == []


@pytest.mark.parametrize("path", _in_package("protocol"), ids=_name)
def test_protocol_never_imports_config(path: Path) -> None:
    assert [m for m in _imports(path) if m.startswith("corral.config")] == []


@pytest.mark.parametrize("path", [*_in_package("actors"), *_in_package("resilience")],
                         ids=_name)
def test_the_kernel_and_the_toolkit_know_nothing_of_serving(path: Path) -> None:
    """actors/ and resilience/ import nothing from runtime/, engine/ or server/."""
    assert [m for m in _imports(path) if m.startswith(SERVING)] == []


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
    "tests").glob("*.py"))], ids=lambda p: str(p.relative_to(SOURCE.parent.parent)))
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
