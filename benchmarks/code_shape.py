"""The shape of the code, measured with `ast` (nothing is imported or run): the floors of
docs/architecture.md, the imports that run up a floor, import loops between packages, training
loops, the largest file, the longest function and the functions of more than 8 parameters.

    python benchmarks/code_shape.py                 # this checkout
    python benchmarks/code_shape.py --root DIR      # another one, e.g. an older commit:
    git worktree add /tmp/old b24e729 && python benchmarks/code_shape.py --root /tmp/old

tests/test_architecture.py holds the package to these floors (it imports this file).

A module's imports are every `import` and `from ... import` in it, those inside functions
included (a lazy import is still a dependency). A unit is a folder directly under
src/reflectionflow/ (engine, backends, ...) or a module beside them (config.py, io.py, ...); the
package's own __init__.py (the API's face, which imports the pipeline on first use) is on no floor.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "reflectionflow"

# The floors, bottom up: a unit may import its own floor's units (without a loop) and any floor below.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("version", "runtime", "redact", "stats", "shipped", "io", "config", "components", "runs", "plots",
                "flags")),
    ("world", ("world", "models")),
    ("backends", ("backends",)),
    ("engine", ("engine", "serve")),
    ("report", ("report", "metrics")),
    ("data and train", ("data", "train", "pipeline")),
    ("command line", ("cli", "__main__")),
)
FLOOR_OF: dict[str, int] = {unit: i for i, (_, units) in enumerate(FLOORS) for unit in units}
MAX_PARAMETERS = 8


@dataclass(frozen=True)
class Import:
    source: str  # module: reflectionflow.engine.runner
    target: str  # module or package: reflectionflow.report
    line: int

    @property
    def units(self) -> tuple[str, str]:
        return unit(self.source), unit(self.target)


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    imports: list[Import] = field(default_factory=list)


def unit(module: str) -> str:
    """reflectionflow.engine.runner -> engine; reflectionflow.io -> io; reflectionflow -> '' (the face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_modules(root: Path) -> dict[str, Module]:
    """Every module of src/reflectionflow, with its imports of the package's own modules."""
    src = root / "src"
    paths = sorted(p for p in (src / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts)
    modules: dict[str, Module] = {}
    for path in paths:
        text = path.read_text(encoding="utf-8")
        name = module_name(path, src)
        modules[name] = Module(name, path, ast.parse(text, filename=str(path)), len(text.splitlines()))
    for m in modules.values():
        package = m.name if m.path.name == "__init__.py" else m.name.rpartition(".")[0]
        for node in ast.walk(m.tree):
            for target in _targets(node, package, modules):
                if target.split(".")[0] == PACKAGE:
                    m.imports.append(Import(m.name, target, node.lineno))
    return modules


def _targets(node: ast.AST, package: str, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    # `from . import engine` imports the module engine; `from .runs import RunFolder` the module runs.
    subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in modules]
    return subs if len(subs) == len(node.names) else [name, *subs]


def unit_edges(modules: dict[str, Module]) -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = {}
    for m in modules.values():
        for imp in m.imports:
            a, b = imp.units
            if a and b and a != b:
                edges.setdefault((a, b), []).append(imp)
    return edges


def upward(modules: dict[str, Module]) -> list[Import]:
    """Imports of a unit on a higher floor (a unit on no floor counts as the top)."""
    top = len(FLOORS)
    return [imp for edge in unit_edges(modules).values() for imp in edge
            if FLOOR_OF.get(imp.units[1], top) > FLOOR_OF.get(imp.units[0], top)]


def unplaced(modules: dict[str, Module]) -> list[str]:
    """Units that no floor names."""
    return sorted({unit(m) for m in modules} - set(FLOOR_OF) - {""})


def loops(edges) -> list[list[str]]:
    """The import loops between units: strongly connected groups of more than one (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def functions(modules: dict[str, Module]):
    for m in modules.values():
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield m, node


def parameters(fn: ast.FunctionDef) -> int:
    """Named parameters, self and cls not counted (*args and **kwargs count one each)."""
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return len([n for n in names if n not in ("self", "cls")])


def training_loops(modules: dict[str, Module]) -> list[str]:
    """Functions with a for / while loop that calls .backward(): a hand-written training loop."""
    found = []
    for m, fn in functions(modules):
        for loop in (n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.While))):
            if any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "backward"
                   for c in ast.walk(loop)):
                found.append(f"{m.path.name}:{fn.name}")
                break
    return sorted(set(found))


def measure(root: Path) -> dict:
    modules = read_modules(root)
    edges = unit_edges(modules)
    up = upward(modules)
    fns = list(functions(modules))
    longest_m, longest = max(fns, key=lambda x: x[1].end_lineno - x[1].lineno)
    largest = max(modules.values(), key=lambda m: m.lines)
    wide = sorted(f"{m.path.relative_to(root)}:{fn.name} ({parameters(fn)})" for m, fn in fns
                  if parameters(fn) > MAX_PARAMETERS)
    return {
        "training loops": training_loops(modules),
        "upward imports": len(up),
        "upward unit arrows": sorted({f"{a} -> {b}" for a, b in (imp.units for imp in up)}),
        "import loops between units": loops(edges),
        "largest file": f"{largest.path.relative_to(root)} ({largest.lines} lines)",
        "longest function": f"{longest_m.path.relative_to(root)}:{longest.name} "
                            f"({longest.end_lineno - longest.lineno + 1} lines)",
        f"functions over {MAX_PARAMETERS} parameters": len(wide),
        "unplaced units": unplaced(modules),
        "_wide": wide,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="a checkout (default: this one)")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("--wide", action="store_true", help="also list the functions of more than 8 parameters")
    args = ap.parse_args(argv)
    shape = measure(Path(args.root))
    wide = shape.pop("_wide")
    if args.json:
        print(json.dumps(shape | ({"wide": wide} if args.wide else {}), indent=1))
        return 0
    for key, value in shape.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}" + "".join(f"\n  {v}" for v in value))
        else:
            print(f"{key}: {value}")
    if args.wide:
        print("\n".join(wide))
    return 0


if __name__ == "__main__":
    sys.exit(main())
