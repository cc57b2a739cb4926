"""The package's dependency rule, checked statically on the source (``ast``, nothing is imported for it):

* no import cycle among ``visiontune`` modules;
* no module imports another module's ``_private`` name (a name another module needs is public API of its
  module, or it lives in the module that needs it).

Every ``import`` statement counts: module level, inside functions, and under ``if TYPE_CHECKING:`` (a
cycle there is still a coupling). Imports of a package's ``__init__`` by its own submodules do not make
edges (importing a submodule imports its packages first anyway); the package re-exporting its children
does. Dynamic imports by string (``importlib.import_module``, ``visiontune.cli.TOOLS``) are not imports.

Also here: every public name resolves (``vt.__all__``, every module's ``__all__``, the ``visiontune.*``
and ``vt.*`` names the docs use), and a size report with a ceiling.
"""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "visiontune"

# Sizes: no module over MAX_MODULE_LINES lines and no function over MAX_FUNCTION_LINES (the ceilings of how
# many may be over were lowered to 0 once the package was split up by concept, issue #12).
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
MODULES_OVER_CEILING = 0
FUNCTIONS_OVER_CEILING = 0


# ------------------------------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class Source:
    text: str
    is_package: bool  # an __init__.py
    path: str = ""


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the visiontune module the statement reaches
    name: str | None  # the name taken from it (None: the module itself)
    line: int

    def __str__(self) -> str:
        what = self.target if self.name is None else f"{self.target}.{self.name}"
        return f"{self.importer} (line {self.line}) imports {what}"


def package_sources(root: Path = PACKAGE) -> dict[str, Source]:
    """``{"visiontune.x.y": Source}`` for every ``.py`` file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = Source(path.read_text(encoding="utf-8"), is_package, str(path))
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _owner(name: str, modules: dict[str, Source]) -> str | None:
    """The module a dotted name lives in (itself, or the nearest enclosing module)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in modules else None


def imports_of(modules: dict[str, Source]) -> list[Import]:
    """Every import of a package module by a package module, with the name it takes."""
    top = {m.split(".")[0] for m in modules}
    found: list[Import] = []
    for importer, src in modules.items():
        package = importer if src.is_package else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(src.text, src.path or importer)):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    origin = f"{base}.{node.module}" if node.module else base
                else:
                    origin = node.module or ""
                if origin.split(".")[0] not in top:
                    continue
                for alias in node.names:
                    if alias.name == "*":
                        found.append(Import(importer, _owner(origin, modules) or origin, None, node.lineno))
                    elif f"{origin}.{alias.name}" in modules:  # a submodule: ``from . import x``
                        found.append(Import(importer, f"{origin}.{alias.name}", None, node.lineno))
                    else:
                        found.append(Import(importer, _owner(origin, modules) or origin, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in top:
                        found.append(Import(importer, _owner(alias.name, modules) or alias.name, None, node.lineno))
    return found


def private_imports(modules: dict[str, Source]) -> list[str]:
    """Imports of another module's ``_name``, or of a submodule named ``_x`` (``from . import _x``)."""
    bad = []
    for imp in imports_of(modules):
        if imp.target == imp.importer:
            continue  # a module's own names
        if imp.name is not None:
            private = _is_private(imp.name)
        else:
            private = any(_is_private(part) for part in imp.target.split("."))
        if private:
            bad.append(str(imp))
    return bad


def import_graph(modules: dict[str, Source]) -> dict[str, set[str]]:
    """importer -> the package modules it imports (not itself, not the packages it lives in)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports_of(modules):
        t = imp.target
        if t not in modules or t == imp.importer or imp.importer.startswith(t + "."):
            continue
        graph[imp.importer].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# ------------------------------------------------------------------------------------------ the rule
def test_no_import_cycles():
    found = cycles(import_graph(package_sources()))
    assert not found, "import cycles (move the shared piece to a lower module, or pass it in):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_cross_module_private_imports():
    found = private_imports(package_sources())
    assert not found, ("imports of another module's private names (make the name public API of its module, "
                       "or move it where it is used):\n" + "\n".join(found))


def test_the_checks_see_every_kind_of_import():
    # a fake package: vt (package), vt.a, vt.b, vt.pkg (package), vt.pkg.c, vt.pkg._hidden
    mods = {
        "vt": Source("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n", True),
        "vt.a": Source("def f():\n    from .b import g\n", False),
        "vt.b": Source("from vt.a import _helper\nimport vt.pkg.c\nfrom . import __version__\n", False),
        "vt.pkg": Source("from . import _hidden\nfrom .c import _mine\n", True),
        "vt.pkg.c": Source("from .. import __version__\nfrom .c import _own\nfrom . import thing\n", False),
        "vt.pkg._hidden": Source("from .. import b\n", False),
    }
    graph = import_graph(mods)
    assert graph["vt.a"] == {"vt.b"}  # function-level import
    assert graph["vt"] == {"vt.a"}  # TYPE_CHECKING import
    assert graph["vt.b"] == {"vt.a", "vt.pkg.c"}  # absolute ``from vt.a``, ``import vt.pkg.c``; parent ignored
    assert graph["vt.pkg.c"] == set()  # its packages (``from .. import``, ``from . import thing``): no edge
    assert graph["vt.pkg"] == {"vt.pkg._hidden", "vt.pkg.c"}  # a package re-exporting its children: edges
    assert cycles(graph) == [["vt.a", "vt.b"]]
    assert sorted(private_imports(mods)) == [
        "vt.b (line 1) imports vt.a._helper",  # absolute form
        "vt.pkg (line 1) imports vt.pkg._hidden",  # ``from . import _x`` of a submodule named _x
        "vt.pkg (line 2) imports vt.pkg.c._mine",  # a package is not its children: cross-module
    ]  # ``__version__`` (dunder) and ``vt.pkg.c``'s own ``_own`` do not count
    assert cycles(import_graph({**mods, "vt.a": Source("x = 1\n", False)})) == []


# ------------------------------------------------------------------------------------------ public names
def test_every_public_name_resolves():
    import visiontune as vt

    missing = [name for name in vt.__all__ if not hasattr(vt, name)]
    assert not missing, f"vt.__all__ names that do not resolve: {missing}"


def test_every_module_all_resolves():
    missing = []
    for name in package_sources():
        module = importlib.import_module(name)
        missing += [f"{name}.{n}" for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not missing, f"__all__ entries that do not exist: {missing}"


def _resolve(ref: str):
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(ref)


def test_names_the_docs_use_resolve():
    """``visiontune.x.y`` (README, CONTRIBUTING, docs, configs' class paths) and ``vt.name`` (README)."""
    import visiontune as vt

    texts = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "configs").glob("*.yaml"))]
    refs, short = set(), set()
    for path in texts:
        text = path.read_text(encoding="utf-8")
        refs |= set(re.findall(r"\bvisiontune(?:\.[A-Za-z_]\w*)+(?![\w*])", text))  # not a pattern (atomic_*)
        short |= set(re.findall(r"\bvt\.([A-Za-z_]\w*)", text))
    assert len(refs) > 5 and len(short) > 5  # the scan found the docs
    broken = []
    for ref in sorted(refs):
        try:
            _resolve(ref)
        except (ImportError, AttributeError) as exc:
            broken.append(f"{ref} ({exc})")
    broken += [f"vt.{n}" for n in sorted(short) if not hasattr(vt, n)]
    assert not broken, f"names the docs use that do not resolve: {broken}"


@pytest.mark.parametrize("module, name", [
    ("visiontune.semisup", "EMATeacher"), ("visiontune.semisup", "DistributionAlignment"),
    ("visiontune.semisup", "FlexMatchThresholds"), ("visiontune.compare", "StrategySpec"),
    ("visiontune.fixmatch", "ema_decay"), ("visiontune.cli", "register_tool"), ("visiontune.cli", "main"),
    ("visiontune.strategies", "register_strategy"), ("visiontune.delta", "TaskBank"),
    ("visiontune.delta", "DeltaWriter"), ("visiontune.delta", "build_from_delta"),
])
def test_old_import_paths_keep_working(module, name):
    assert hasattr(importlib.import_module(module), name)


DEPRECATED_PATHS = {
    "visiontune.semisup": "visiontune.objectives.semisup", "visiontune.fixmatch": "visiontune.objectives.fixmatch",
    "visiontune.compare": "visiontune.comparison.api", "visiontune.tuning": "visiontune.schedule.tuning",
    "visiontune.checkpoint": "visiontune.training.checkpoint", "visiontune.checks": "visiontune.data.checks",
}


def test_deprecated_module_paths_warn_and_give_the_moved_names():
    import json
    import subprocess
    import sys

    code = ("import importlib, json, sys, warnings\n"
            "out = {}\n"
            "for old, new in json.loads(sys.argv[1]).items():\n"
            "    with warnings.catch_warnings(record=True) as w:\n"
            "        warnings.simplefilter('always')\n"
            "        module = importlib.import_module(old)\n"
            "    moved = importlib.import_module(new)\n"
            "    same = all(getattr(module, n) is getattr(moved, n) for n in moved.__all__)\n"
            "    out[old] = [same, [(x.category.__name__, str(x.message)) for x in w]]\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(DEPRECATED_PATHS)], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert json.loads(proc.stdout) == {
        old: [True, [["DeprecationWarning", f"{old} is deprecated: import {new} instead"]]]
        for old, new in DEPRECATED_PATHS.items()
    }


def test_a_deprecated_visiontune_compare_import_keeps_vt_compare_callable():
    import visiontune as vt

    with pytest.warns(DeprecationWarning):
        importlib.reload(importlib.import_module("visiontune.compare"))
    assert callable(vt.compare) and vt.compare.StrategySpec is importlib.import_module(
        "visiontune.comparison.api").StrategySpec


def test_every_cli_tool_resolves_without_lightning():
    import subprocess
    import sys

    code = ("import sys, visiontune.cli as c\n"
            "assert all(callable(c.load_tool(n)) for n in c.TOOLS)\n"
            "print(sorted(c.TOOLS), 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ("['check-data', 'compare', 'export', 'lr-find', 'report', 'schedule', 'strategies', "
                                  "'suggest'] False")


# ------------------------------------------------------------------------------------------ size report
def size_report(modules: dict[str, Source]) -> tuple[list[str], list[str]]:
    """Modules over MAX_MODULE_LINES lines and functions (methods, nested ones too) over MAX_FUNCTION_LINES."""
    big_modules, big_functions = [], []
    for name, src in modules.items():
        n = len(src.text.splitlines())
        if n > MAX_MODULE_LINES:
            big_modules.append(f"{name}: {n} lines")
        for node in ast.walk(ast.parse(src.text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big_functions.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    return sorted(big_modules), sorted(big_functions)


def test_size_report_sees_a_long_module_and_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # def line + 80 = 81 lines
    mods = {
        "vt.big": Source("def f():\n" + body + "\n" * (MAX_MODULE_LINES - MAX_FUNCTION_LINES), False),
        "vt.ok": Source("def g():\n" + body[: body.index("    x79")] + "\n" * 10, False),
    }
    assert size_report(mods) == ([f"vt.big: {MAX_MODULE_LINES + 1} lines"],
                                 [f"vt.big.f (line 1): {MAX_FUNCTION_LINES + 1} lines"])


def test_size_report_does_not_grow():
    """Prints the modules over 450 lines and the functions over 80 lines (see it with
    ``pytest -rP tests/test_architecture.py``; it is also a warning in the summary) and fails when there are
    more of them than MODULES_OVER_CEILING / FUNCTIONS_OVER_CEILING allow: none. Split a module by concept
    (or a function into steps) instead of raising them."""
    modules, functions = size_report(package_sources())
    report = (f"modules over {MAX_MODULE_LINES} lines ({len(modules)}, ceiling {MODULES_OVER_CEILING}):\n  "
              + "\n  ".join(modules)
              + f"\nfunctions over {MAX_FUNCTION_LINES} lines ({len(functions)}, ceiling {FUNCTIONS_OVER_CEILING}):"
              + "\n  " + "\n  ".join(functions))
    print(report)
    warnings.warn(report, UserWarning, stacklevel=1)
    assert len(modules) <= MODULES_OVER_CEILING, report
    assert len(functions) <= FUNCTIONS_OVER_CEILING, report
