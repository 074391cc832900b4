"""The floors of docs/architecture.md hold: no import runs up a floor, no two packages import each
other (directly or round a loop), below the command line no module reads the environment or the
process's arguments, and every trainer trains through the one training loop (train/loop.py).

Every module's imports are read with `ast` (benchmarks/code_shape.py), those inside functions
included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from .conftest import ROOT, load_benchmark_module

shape = load_benchmark_module("code_shape")

# Below cli/, the environment is read nowhere; these pass it on whole and read nothing in it.
PASSES_THE_ENVIRONMENT_ON = {
    "reflectionflow.data.harvest",  # the searches it starts as subprocesses inherit it (PYTHONUNBUFFERED added)
}


@pytest.fixture(scope="module")
def modules():
    return shape.read_modules(ROOT)


def _where(imp) -> str:
    return f"{imp.source} (line {imp.line}) imports {imp.target}"


def test_every_package_stands_on_a_floor(modules):
    assert shape.unplaced(modules) == [], "add the new package or module to FLOORS in benchmarks/code_shape.py"


def test_no_import_runs_up_a_floor(modules):
    up = shape.upward(modules)
    floors = {u: name for name, units in shape.FLOORS for u in units}
    assert not up, "imports of a higher floor:\n" + "\n".join(
        f"{_where(imp)}: {floors[imp.units[0]]} floor -> {floors[imp.units[1]]} floor" for imp in up)


def test_no_import_loop_between_packages(modules):
    edges = shape.unit_edges(modules)
    found = shape.loops(edges)
    assert not found, "import loops: " + "; ".join(
        " <-> ".join(group) + " (" + ", ".join(_where(edges[a, b][0]) for a in group for b in group
                                               if (a, b) in edges) + ")" for group in found)


def test_below_the_command_line_nothing_reads_the_environment_or_the_arguments(modules):
    found = []
    for m in modules.values():
        if shape.unit(m.name) == "cli" or m.name in PASSES_THE_ENVIRONMENT_ON:
            continue
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                    (node.value.id, node.attr) in {("os", "environ"), ("os", "getenv"), ("sys", "argv")}):
                found.append(f"{m.name} (line {node.lineno}): {node.value.id}.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "parse_args", "parse_known_args"):
                found.append(f"{m.name} (line {node.lineno}): {node.func.attr}()")
            if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                    a.name in ("environ", "getenv") for a in node.names):
                found.append(f"{m.name} (line {node.lineno}): from os import environ / getenv")
    assert not found, "read them in cli/ and pass them in:\n" + "\n".join(found)


def test_every_trainer_trains_through_the_one_loop(modules):
    assert shape.training_loops(modules) == ["loop.py:run_loop"], (
        "a training loop beside train/loop.py's run_loop: pass what differs as LoopHooks instead")


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of src/reflectionflow's modules to break."""
    src = ROOT / "src" / "reflectionflow"
    for path in src.rglob("*.py"):
        if "__pycache__" not in path.parts and "weights" not in path.relative_to(src).parts:
            to = tmp_path / "src" / "reflectionflow" / path.relative_to(src)
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, to)
    return tmp_path


def _add(tree: Path, module: str, line: str) -> None:
    path = tree / "src" / module
    path.write_text(path.read_text() + line)


def test_the_checks_fail_on_a_wrong_way_import(tree):
    # A lazy import inside a function counts: the engine writing the report again (report imports the engine).
    _add(tree, "reflectionflow/engine/runner.py", "\n\ndef _report(root):\n    from ..report import write_report\n"
                                                  "\n    write_report(root)\n")
    modules = shape.read_modules(tree)
    assert ("reflectionflow.engine.runner", "reflectionflow.report") in [(i.source, i.target)
                                                                         for i in shape.upward(modules)]
    assert ["engine", "report"] in shape.loops(shape.unit_edges(modules))


def test_the_checks_fail_on_a_loop_within_a_floor_and_on_a_new_package(tree):
    _add(tree, "reflectionflow/config.py", "\nfrom .runs import RunFolder  # noqa\n")  # runs imports config
    (tree / "src" / "reflectionflow" / "extra").mkdir()
    (tree / "src" / "reflectionflow" / "extra" / "__init__.py").write_text("from ..engine import search\n")
    modules = shape.read_modules(tree)
    # The same floor, and a package on no floor counts as the top: neither is an upward import.
    assert not [i for i in shape.upward(modules) if i.source in ("reflectionflow.config", "reflectionflow.extra")]
    assert ["config", "runs"] in shape.loops(shape.unit_edges(modules))
    assert "extra" in shape.unplaced(modules)


def test_the_check_finds_a_second_training_loop(tree):
    _add(tree, "reflectionflow/train/world.py", "\n\ndef _train(model, batches, opt):\n    for b in batches:\n"
                                                "        model(b).mean().backward()\n        opt.step()\n")
    assert shape.training_loops(shape.read_modules(tree)) == ["loop.py:run_loop", "world.py:_train"]
