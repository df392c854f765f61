"""The layers of CONTRIBUTING.md ("Architecture"), checked from the source: every import (a lazy one inside a
function included) points down or sideways, never up, and no two modules import each other, directly or
through others. Run ``python tests/test_architecture.py`` for the import graph's figures."""
from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top. A module belongs to the first layer with a prefix it matches ("clipfast.x" matches the
# module clipfast.x and everything under it). A module may import its own layer and the layers below.
LAYERS = [
    ("kernels", ["clipfast.kernels"]),
    ("core", ["clipfast._validate", "clipfast.numerics", "clipfast.models"]),
    ("ops", ["clipfast.ops"]),
    ("dispatch", ["clipfast.dispatching"]),
    ("modules", ["clipfast.nn", "clipfast.unpad"]),
    ("integrations", ["clipfast.patch_rules", "clipfast.integrations"]),
    ("patching", ["clipfast.patching", "clipfast.autopatching"]),
    ("package", ["clipfast", "clipfast._cli_guard"]),
    ("tools", ["clipfast.verify", "clipfast.verify_models", "clipfast.aot", "clipfast.warm", "clipfast.tune",
               "clipfast.tune_kernels", "clipfast.monitor", "clipfast.launcher", "clipfast.testing",
               "clipfast.benchmarks", "clipfast.gpu_check", "clipfast.cli", "clipfast.__main__"]),
]


def _module_files() -> dict[str, str]:
    """Module name -> file, for clipfast/ and kernels/ (installed as clipfast.kernels)."""
    modules = {}
    for folder, package in (("clipfast", "clipfast"), ("kernels", "clipfast.kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for name in files:
                if name.endswith(".py"):
                    dotted = parts if name == "__init__.py" else parts + [name[:-3]]
                    modules[".".join(dotted)] = os.path.join(dirpath, name)
    return modules


def import_graph() -> dict[str, set[str]]:
    """Every module's imports of other project modules, wherever in the file the import statement stands.
    ``from package import name`` counts as an import of ``package.name`` when that is a module, else of
    ``package``; a package's ``__init__`` is not counted as imported by its submodules' imports."""
    modules = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS: add it")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
            for m in sorted(graph) for t in sorted(graph[m]) if layer_of(t) > layer_of(m)]


def test_every_module_is_in_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_from_a_layer_above():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_kernels_import_only_torch_triton_and_themselves():
    outside = []
    for name, path in _module_files().items():
        if not name.startswith("clipfast.kernels"):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("clipfast") \
                    and not node.module.startswith("clipfast.kernels"):
                outside.append(f"{name}: from {node.module} import ...")
            if isinstance(node, ast.Import):
                outside += [f"{name}: import {a.name}" for a in node.names
                            if a.name.startswith("clipfast") and not a.name.startswith("clipfast.kernels")]
    assert outside == []


@pytest.mark.parametrize("bad", ["up", "cycle"])
def test_the_checks_catch_what_they_look_for(bad):
    graph = {"clipfast.kernels.runtime": set(), "clipfast.ops.mlp": {"clipfast.kernels.runtime"},
             "clipfast.nn.mlp": {"clipfast.ops.mlp"}}
    if bad == "up":
        graph["clipfast.kernels.runtime"].add("clipfast.nn.mlp")
        assert upward_imports(graph) and cycles(graph)
        graph["clipfast.kernels.runtime"].clear()
        graph["clipfast.ops.mlp"].add("clipfast.nn.mlp")
        assert upward_imports(graph) == ["clipfast.ops.mlp (ops) imports clipfast.nn.mlp (modules)"]
    else:
        graph["clipfast.ops.other"] = {"clipfast.ops.mlp"}
        graph["clipfast.ops.mlp"].add("clipfast.ops.other")
        assert upward_imports(graph) == [] and cycles(graph) == [["clipfast.ops.mlp", "clipfast.ops.other"]]


if __name__ == "__main__":
    g = import_graph()
    files = _module_files()
    for index, (layer, _) in enumerate(LAYERS):
        members = [m for m in g if layer_of(m) == index]
        lines = sum(sum(1 for _ in open(files[m], encoding="utf-8")) for m in members)
        print(f"{layer:13s} {len(members):3d} modules {lines:6d} lines")
    found = cycles(g)
    print(f"cycles: {len(found)}")
    for c in found:
        print("  ", len(c), " ".join(c))
    up = upward_imports(g)
    print(f"upward imports: {len(up)}")
    for line in up:
        print("  ", line)
