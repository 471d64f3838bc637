"""The package's layering (docs/design.md "Layers"), checked on the source with ``ast``; nothing is imported.

Tiers, highest first: ``serving/`` → ``engine/`` → ``runtime/`` → ``model/`` → ``kernels/``. A module imports only
modules of its own tier or of lower tiers. ``text/`` (tokenizers, prompt, decoding, detokenizer) is usable from every
tier and itself imports only ``config``, ``errors`` and ``text/``. The top-level ``config``, ``errors`` and
``presets`` (and the package's ``__init__``) are usable from everywhere and import only each other. Every import
counts: inside functions, under ``if TYPE_CHECKING:``, relative ones, ``importlib.import_module("...")``.

A new sub-package or top-level module fails here until it is given a place in :data:`TIERS` (and in the layer
picture of docs/design.md). Every module must also have its row in docs/design.md's file table.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "infinisst_backend"
DESIGN = ROOT / "docs" / "design.md"

# Sub-package -> rank: a module may import modules of a rank <= its own (and the shared groups below).
TIERS = {"serving": 5, "engine": 4, "runtime": 3, "model": 2, "kernels": 1}
# Usable from every tier; imports only BASE_TEXT and itself.
TEXT = "text"
# Top-level modules usable from everywhere; they import only each other.
BASE = {"config.py", "errors.py", "presets.py", "__init__.py"}
# What text/ may import besides text/ itself.
BASE_TEXT = {"config.py", "errors.py"}


@dataclass(frozen=True)
class Import:
    source: str  # module path relative to the package, e.g. "engine/scheduler.py"
    target: str  # module path of the imported module, or "?" + dotted name when no module of the package has it
    line: int
    text: str  # the import as written (first line)

    def where(self) -> str:
        return f"{PACKAGE}/{self.source}:{self.line}: {self.text!r}"


def modules(package_dir: Path) -> list[str]:
    """Every module file of the package, as paths relative to it (``engine/scheduler.py``)."""
    return sorted(
        p.relative_to(package_dir).as_posix() for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts
    )


def _module_for(dotted: str, known: set[str]) -> str | None:
    """The module file of a dotted name inside the package, or None."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    rel = "/".join(parts[1:])
    for candidate in ((rel + ".py") if rel else None, (rel + "/__init__.py") if rel else "__init__.py"):
        if candidate in known:
            return candidate
    return None


def _package_of(module: str) -> list[str]:
    """Dotted parts of the package a module belongs to (for relative imports)."""
    parts = module[: -len(".py")].split("/")
    return [PACKAGE, *parts[:-1]]


def imports_of(package_dir: Path, module: str, known: set[str]) -> list[Import]:
    """The package-internal imports of one module, wherever they appear in it."""
    source = (package_dir / module).read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(package_dir / module))
    lines = source.splitlines()
    found: list[Import] = []

    def add(node: ast.AST, dotted: str) -> None:
        target = _module_for(dotted, known)
        text = lines[node.lineno - 1].strip()
        found.append(Import(module, target if target is not None else "?" + dotted, node.lineno, text))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module)
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                dotted = ".".join(base + ([node.module] if node.module else []))
            else:
                dotted = node.module or ""
            if dotted.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
                sub = f"{dotted}.{alias.name}"
                add(node, sub if alias.name != "*" and _module_for(sub, known) else dotted)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith(PACKAGE):
                    add(node, arg.value)
    return found


def import_graph(package_dir: Path) -> tuple[list[str], list[Import]]:
    mods = modules(package_dir)
    known = set(mods)
    edges = [imp for mod in mods for imp in imports_of(package_dir, mod, known)]
    return mods, edges


def group(module: str) -> str | None:
    """``"base"``, ``"text"``, a tier name, or None for a module with no place in the layers."""
    parts = module.split("/")
    if len(parts) == 1:
        return "base" if module in BASE else None
    if parts[0] == TEXT or parts[0] in TIERS:
        return parts[0]
    return None


def allowed(source: str, target: str) -> bool:
    src, dst = group(source), group(target)
    if target == "__init__.py":  # the package itself, which every import of the package runs anyway
        return True
    if src == "base":
        return dst == "base"
    if src == TEXT:
        return dst == TEXT or target in BASE_TEXT
    if dst in ("base", TEXT):
        return True
    return src in TIERS and dst in TIERS and TIERS[dst] <= TIERS[src]


def placement_problems(mods: list[str]) -> list[str]:
    problems = []
    for mod in mods:
        if group(mod) is None:
            where = mod.split("/")[0] + "/" if "/" in mod else mod
            problems.append(
                f"{PACKAGE}/{mod}: {where} has no place in the layers; add it to TIERS in tests/test_layout.py "
                f"(tiers {', '.join(TIERS)}; shared: {TEXT}/, {', '.join(sorted(BASE))}) and to docs/design.md"
            )
    return problems


def layer_violations(edges: list[Import]) -> list[str]:
    problems = []
    for imp in edges:
        if imp.target.startswith("?"):
            problems.append(f"{imp.where()} imports {imp.target[1:]}, which is no module of the package")
        elif group(imp.source) is not None and group(imp.target) is not None and not allowed(imp.source, imp.target):
            src, dst = group(imp.source), group(imp.target)
            if src == "base":
                why = "config, errors and presets import only each other"
            elif src == TEXT:
                why = f"{TEXT}/ imports only config, errors and {TEXT}/"
            else:
                why = f"{src}/ may not import {dst}/, a higher tier"
            problems.append(f"{imp.where()} imports {imp.target}: {why}")
    return problems


def cycles(mods: list[str], edges: list[Import]) -> list[list[Import]]:
    """One cycle (as its imports) per strongly connected component of more than one module."""
    out: dict[str, list[Import]] = {m: [] for m in mods}
    for imp in edges:
        if imp.target in out and imp.target != imp.source:
            out[imp.source].append(imp)

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan; the package is far too small for the recursion limit
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for imp in out[node]:
            if imp.target not in index:
                visit(imp.target)
                low[node] = min(low[node], low[imp.target])
            elif imp.target in on_stack:
                low[node] = min(low[node], index[imp.target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for mod in mods:
        if mod not in index:
            visit(mod)

    found = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest path start -> ... -> start inside the component (breadth first).
        previous: dict[str, Import] = {}
        frontier = [start]
        done = False
        while frontier and not done:
            following = []
            for node in frontier:
                for imp in out[node]:
                    if imp.target not in members or imp.target in previous:
                        continue
                    previous[imp.target] = imp
                    if imp.target == start:
                        done = True
                        break
                    following.append(imp.target)
                if done:
                    break
            frontier = following
        path = [previous[start]]
        while path[-1].source != start:
            path.append(previous[path[-1].source])
        found.append(path[::-1])
    return found


def design_table(text: str) -> list[str] | None:
    """The module paths named in the first cell of the file table's rows (section "## Files ..."), or None."""
    section = re.search(r"^## Files\b.*?$(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    if section is None:
        return None
    listed = []
    for line in section.group(1).splitlines():
        if line.startswith("|"):
            first = line.strip().strip("|").split("|")[0]
            listed += re.findall(r"`([^`]+\.py)`", first)
    return listed


def has_code(path: Path) -> bool:
    """Anything in the file besides a docstring."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


# -- the package ---------------------------------------------------------------------------------------------------


def test_every_module_has_a_place_in_the_layers():
    mods, _ = import_graph(ROOT / PACKAGE)
    assert mods, "no modules found"
    problems = placement_problems(mods)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_imports_follow_the_layers():
    _, edges = import_graph(ROOT / PACKAGE)
    problems = layer_violations(edges)
    if problems:
        rules = (
            f"layers {' > '.join(TIERS)} (a tier imports its own and lower tiers, {TEXT}/ and the top-level modules); "
            f"{TEXT}/ imports only config, errors, {TEXT}/; config, errors, presets import only each other"
        )
        pytest.fail(f"imports against the layer direction ({rules}):\n" + "\n".join(problems), pytrace=False)


def test_no_import_cycle():
    mods, edges = import_graph(ROOT / PACKAGE)
    found = cycles(mods, edges)
    if found:
        message = "import cycles:\n" + "\n".join(
            " -> ".join([cycle[0].source] + [imp.target for imp in cycle])
            + "".join(f"\n    {imp.where()}" for imp in cycle)
            for cycle in found
        )
        pytest.fail(message, pytrace=False)


def test_design_table_lists_every_module_and_only_modules():
    package_dir = ROOT / PACKAGE
    listed = design_table(DESIGN.read_text(encoding="utf-8"))
    assert listed is not None, f"{DESIGN.relative_to(ROOT)} has no '## Files ...' section with the file table"
    mods = modules(package_dir)
    required = [m for m in mods if not m.endswith("__init__.py") or has_code(package_dir / m)]
    missing = [m for m in required if m not in listed]
    absent = [m for m in listed if not (package_dir / m).is_file()]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    problems = [f"{m}: module without a row in docs/design.md's file table" for m in missing]
    problems += [f"{m}: listed in docs/design.md's file table, but {PACKAGE}/{m} does not exist" for m in absent]
    problems += [f"{m}: listed more than once in docs/design.md's file table" for m in twice]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# -- the checker itself, on a package made up for it ---------------------------------------------------------------


def _make_package(tmp_path: Path, files: dict[str, str]) -> Path:
    package_dir = tmp_path / PACKAGE
    for rel, body in {"__init__.py": "", **files}.items():
        path = package_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
        for parent in path.relative_to(package_dir).parents:
            (package_dir / parent / "__init__.py").touch()
    return package_dir


def test_checker_finds_upward_hidden_and_relative_imports(tmp_path):
    package_dir = _make_package(
        tmp_path,
        {
            "config.py": "",
            "presets.py": "from infinisst_backend.config import X\n",
            "kernels/k.py": "def f():\n    from infinisst_backend.model import m\n",  # inside a function
            "model/m.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..runtime.r import R\n"  # relative
                "from infinisst_backend.text import t\nfrom . import m2\n"
            ),
            "model/m2.py": "import infinisst_backend.presets\n",
            "runtime/r.py": "from infinisst_backend.model.m import M\nfrom infinisst_backend.kernels import k\n",
            "text/t.py": "from infinisst_backend.presets import P\nfrom infinisst_backend import errors\n",
            "errors.py": "import importlib\nimportlib.import_module('infinisst_backend.engine.e')\n",
            "engine/e.py": "from infinisst_backend.serving.s import S\nfrom infinisst_backend.engine.gone import G\n",
            "serving/s.py": "",
            "extra/x.py": "",
        },
    )
    mods, edges = import_graph(package_dir)
    violations = "\n".join(layer_violations(edges))
    for expected in (
        "kernels/k.py:2: 'from infinisst_backend.model import m' imports model/m.py",
        "model/m.py:3: 'from ..runtime.r import R' imports runtime/r.py",
        "text/t.py:1: 'from infinisst_backend.presets import P' imports presets.py",
        "errors.py:2: \"importlib.import_module('infinisst_backend.engine.e')\" imports engine/e.py",
        "engine/e.py:1: 'from infinisst_backend.serving.s import S' imports serving/s.py",
        "engine/e.py:2: 'from infinisst_backend.engine.gone import G' imports infinisst_backend.engine.gone, which is",
    ):
        assert expected in violations, (expected, violations)
    assert violations.count("\n") == 5, violations  # nothing allowed was flagged
    assert [p.split(":")[0] for p in placement_problems(mods)] == [
        f"{PACKAGE}/extra/__init__.py",
        f"{PACKAGE}/extra/x.py",
    ]
    found = cycles(mods, edges)
    assert [sorted({imp.source for imp in cycle}) for cycle in found] == [
        ["kernels/k.py", "model/m.py", "runtime/r.py"]
    ]


def test_checker_reads_the_design_table():
    text = (
        "# D\n\n## Files and what each owns\n\n| file | owns |\n|---|---|\n"
        "| `a.py`, `b/c.py` | x `d.py` |\n| **engine/** | |\n\n## Next\n| `e.py` | |\n"
    )
    assert design_table(text) == ["a.py", "b/c.py"]
    assert design_table("# D\n") is None
