"""The package's shape: four layers whose imports point down only, no import circle, and each
third-party boundary kept by the one layer that owns it.

Read from the source with ``ast`` (every import counts, including those inside functions), so a
new module is checked the moment it exists.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import chatsrv

PACKAGE = Path(chatsrv.__file__).resolve().parent

# Who may import whom. "base" is _settings, _errors and _metrics; "top" is app, _cli, _service
# and the package's own __init__ and __main__, which compose everything.
ALLOWED = {
    "top": {"top", "http", "engine", "store", "upstream", "base"},
    "http": {"http", "engine", "store", "base"},
    "engine": {"engine", "store", "upstream", "base"},
    "store": {"store", "base"},
    "upstream": {"upstream", "base"},
    "base": {"base"},
}
LAYERS = ("http", "engine", "store", "upstream")

# Third-party packages that only one layer may import: the boundaries its docstring promises.
CONFINED = {
    "sqlalchemy": "store",
    "asyncpg": "store",
    "aiosqlite": "store",
    "alembic": "store",
    "openai": "upstream",
    "httpx2": "upstream",
    "h11": "upstream",
    "quart": "http",
    "hypercorn": "http",
}
# ... except where the top composes the server (the app object, the CLI's hypercorn).
CONFINED_EXCEPTIONS = {("chatsrv.app", "quart"), ("chatsrv._cli", "hypercorn")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if module in ("chatsrv._settings", "chatsrv._errors", "chatsrv._metrics"):
        return "base"
    return "top"


def imports(module: str, path: Path) -> Iterator[str]:
    """Every module that ``module`` imports, absolute (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from . import x`` and ``from pkg import submodule`` import the submodule.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield candidate if candidate in MODULES else base


MODULES = modules()
GRAPH = {
    module: {target for target in imports(module, path) if target in MODULES}
    for module, path in MODULES.items()
}


def test_the_package_has_its_four_layers() -> None:
    for name in LAYERS:
        init = PACKAGE / name / "__init__.py"
        assert init.is_file(), f"chatsrv/{name}/ is not a package"
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert docstring and "May import" in docstring, f"chatsrv/{name}: say what it may import"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    upward = {
        target
        for target in GRAPH[module]
        if layer(target) not in ALLOWED[layer(module)] and target != "chatsrv"
    }
    assert not upward, f"{module} ({layer(module)}) imports upward: {sorted(upward)}"


def test_no_import_circle() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circle = [*path[path.index(module) :], module]
            raise AssertionError("import circle: " + " -> ".join(circle))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            # A package's __init__ importing its own modules is how re-exports work; a module
            # importing its package's __init__ is not a circle of code.
            if target == module.rpartition(".")[0] or target == "chatsrv":
                continue
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(MODULES):
        visit(module, [])


@pytest.mark.parametrize("library", sorted(CONFINED))
def test_third_party_boundaries(library: str) -> None:
    owner = CONFINED[library]
    outside = sorted(
        module
        for module, path in MODULES.items()
        if layer(module) != owner
        and (module, library) not in CONFINED_EXCEPTIONS
        and any(name.split(".")[0] == library for name in imports(module, path))
    )
    assert not outside, f"only chatsrv/{owner}/ may import {library}; also: {outside}"


def test_each_layer_exports_what_it_names() -> None:
    for name in LAYERS:
        package = __import__(f"chatsrv.{name}", fromlist=["__all__"])
        missing = [export for export in package.__all__ if not hasattr(package, export)]
        assert not missing, f"chatsrv.{name}.__all__ names what it lacks: {missing}"


def test_the_app_with_the_demo_model_does_not_import_the_sdk() -> None:
    # The default on a fresh machine; checked in a fresh interpreter.
    code = (
        "import sys, chatsrv.app, chatsrv._cli, chatsrv.upstream; "
        "print(sorted(m for m in ('openai', 'httpx2') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_schema_shipped_in_the_package_is_the_repositorys() -> None:
    # chatsrv/store/schema.sql is the schema written out, shipped in the package for readers;
    # it links to the root's.
    shipped = PACKAGE / "store" / "schema.sql"
    assert shipped.read_text(encoding="utf-8") == (PACKAGE.parent / "schema.sql").read_text(
        encoding="utf-8"
    )
