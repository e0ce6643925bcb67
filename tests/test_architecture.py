"""The code stays easy to enter: data flows one way between hsflow's modules (import-linter's layers contract in
pyproject.toml, imports inside functions included), no two modules import each other even indirectly, and no
function grows past 60 lines."""
import ast
import subprocess
import sys
from pathlib import Path

import grimp

from conftest import ROOT

MAX_FUNCTION_LINES = 60


def test_the_layers_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    assert "ignore_imports" not in contract  # the floors hold without exceptions


FLOORS = {"core", "data", "models", "serving", "training", "lifecycle", "team"}


def test_the_top_level_holds_only_entry_modules_and_the_floors():
    """hsflow/ is the floors (folders) and the commands users type (thin entry modules), nothing else."""
    hsflow = ROOT / "hsflow"
    folders = {p.name for p in hsflow.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == FLOORS
    for module in hsflow.glob("*.py"):
        if module.name == "__init__.py":
            continue
        code = [line for line in module.read_text().splitlines() if line and not line.startswith(('"""', "#"))]
        assert code[0] == "from hsflow import entry" and code[1].startswith("entry(__name__, "), module
        assert len(code) == 2, f"{module} is an entry module: its work belongs in a floor folder"


def test_names_from_before_the_floors_are_the_same_modules():
    """Scripts and models logged before the move import hsflow.bundle, hsflow.recommend, ...: the same objects."""
    import importlib

    import hsflow

    for old, new in hsflow.MOVED.items():
        assert importlib.import_module(f"hsflow.{old}") is importlib.import_module(f"hsflow.{new}"), old


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan): the import cycles."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def _graph(collapse: bool) -> dict[str, set[str]]:
    g = grimp.build_graph("hsflow", include_external_packages=False)
    edges: dict[str, set[str]] = {}
    for m in g.modules:
        for i in g.find_modules_directly_imported_by(m):
            a, b = (".".join(x.split(".")[:2]) for x in (m, i)) if collapse else (m, i)
            if a != b:
                edges.setdefault(a, set()).add(b)
    return edges


def test_no_import_cycle_between_modules_or_sub_packages():
    assert _cycles(_graph(collapse=False)) == []
    assert _cycles(_graph(collapse=True)) == []  # hsflow.data, hsflow.models as wholes, beside the modules


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_in_hsflow_is_longer_than_60_lines():
    long = []
    for path in sorted((ROOT / "hsflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_every_module_sits_in_a_layer_of_the_contract():
    """A new module outside the layers would escape the contract: each top-level module and sub-package is named."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    listed = {name.strip() for layer in layers for name in layer.split("|")}
    hsflow = ROOT / "hsflow"
    present = {f"hsflow.{p.stem}" for p in hsflow.glob("*.py") if p.stem != "__init__"}
    present |= {f"hsflow.{p.name}" for p in hsflow.iterdir() if (p / "__init__.py").is_file()}
    assert present - listed == set()
