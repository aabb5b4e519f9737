"""The package's shape: layers as folders, each importing only its own layer and those below,
and no import cycle between its modules (imports inside functions included, since they run
too)."""

import ast
import pathlib
import subprocess
import sys

import pytest

import minimind_jax
from tests.helpers import subprocess_env

PACKAGE = pathlib.Path(minimind_jax.__file__).parent
# Lowest first; `errors` stands for the top level (errors.py and the package's __init__).
LAYER_ORDER = ("errors", "runtime", "model", "data", "infer", "train", "serve", "tools", "cli")
LAYERS = set(LAYER_ORDER) - {"errors"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its body."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:  # `from pkg import module` imports that module
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in modules else node.module)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str:
    """The layer (folder) of a module of the package; top-level modules are `errors`'s."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER_ORDER else "errors"


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer than the importer's, as a line."""
    rank = {layer: i for i, layer in enumerate(LAYER_ORDER)}
    return sorted(f"{m} ({layer_of(m)}) -> {e} ({layer_of(e)})"
                  for m, edges in graph.items() for e in edges
                  if rank[layer_of(e)] > rank[layer_of(m)])


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_live_in_their_layer():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "errors"}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == LAYERS


def test_layers_import_only_downward():
    graph = import_graph()
    assert {layer_of(m) for m in graph} == set(LAYER_ORDER)
    assert upward_edges(graph) == []


def test_the_upward_finder_finds_one():
    graph = {"minimind_jax.model.weights": {"minimind_jax.train.checkpoint",
                                            "minimind_jax.errors"},
             "minimind_jax.train.checkpoint": {"minimind_jax.model.config"},
             "minimind_jax.errors": set()}
    assert upward_edges(graph) == [
        "minimind_jax.model.weights (model) -> minimind_jax.train.checkpoint (train)"]


def test_the_package_docstring_states_the_order():
    assert " < ".join(LAYER_ORDER) in " ".join(minimind_jax.__doc__.split())


@pytest.mark.parametrize("module", ["minimind_jax.model.weights", "minimind_jax.data.rows",
                                    "minimind_jax.model.transformer"])
def test_importing_a_module_loads_no_higher_layer(module):
    """In a fresh process (this one has loaded everything): what the import really loads,
    lazy and conditional imports at module level included."""
    code = (f"import sys, {module}\n"
            "print('\\n'.join(m for m in sys.modules if m.startswith('minimind_jax')))")
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert module in loaded
    rank = {layer: i for i, layer in enumerate(LAYER_ORDER)}
    higher = [m for m in loaded if rank[layer_of(m)] > rank[layer_of(module)]]
    assert higher == []
    assert not {"minimind_jax.train", "minimind_jax.cli"} & set(loaded)
