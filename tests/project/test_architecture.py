"""The tree's shape (issue 17): no import cycle in `ree_kernels` or `ree`, deferred (function-level)
and TYPE_CHECKING imports included; every import in `ree` runs from a higher layer (`REE_LAYERS`)
to a lower one or within one; `ree_kernels` never imports `ree`; no Python function longer than
`MAX_FUNCTION_LINES`. Read from the source with `ast`, nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"ree_kernels": ROOT / "ree_kernels", "ree": ROOT / "python" / "ree"}
FUNCTION_DIRS = ("ree_kernels", "python/ree", "benchmarks", ".ci", "tests")
MAX_FUNCTION_LINES = 80

REE_LAYERS = (
    ("basics", ("ree.errors", "ree.devices", "ree.runs", "ree.logs", "ree.schedule")),
    ("data and splits", ("ree.data",)),
    ("models", ("ree.models",)),
    ("training", ("ree.losses", "ree.config", "ree.sampler", "ree.distributed", "ree.checkpoint",
                  "ree.checkpoint_layout", "ree.pretrained", "ree.prefix_cache", "ree.insightface_config",
                  "ree.train")),
    ("evaluation", ("ree.evaluation", "ree.quality", "ree.export")),
    ("LFW-VLR benchmark", ("ree.lfw",)),
    ("demo", ("ree.demo",)),
    ("command line", ("ree.cli", "ree.entry", "ree.__main__", "ree")),
)
"""Lowest first. A module belongs to the layer of the longest name here that is it or a package above it."""


def package_modules(package: str) -> Dict[str, Path]:
    """{dotted module name: file} of every module of `package`."""
    base = PACKAGES[package]
    modules = {}
    for path in sorted(base.rglob("*.py")):
        parts = (package,) + path.relative_to(base).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _called_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def imported_modules(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The modules of `modules` that `name` (at `path`) imports anywhere in the file: `from p import m`
    counts as importing the module p.m where there is one, else p; so does
    `importlib.import_module("p.m")` with the name written out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.Call) and _called_name(node.func) in ("import_module", "__import__") \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            targets = [node.args[0].value]
        elif isinstance(node, ast.ImportFrom):
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def import_graph(package: str) -> Dict[str, Set[str]]:
    modules = package_modules(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def layer_of(module: str) -> int:
    owners = [(len(prefix), rank) for rank, (_, prefixes) in enumerate(REE_LAYERS) for prefix in prefixes
              if module == prefix or module.startswith(prefix + ".")]
    assert owners, f"{module} is in no layer of REE_LAYERS: give it one"
    return max(owners)[1]


def test_no_import_cycle_in_ree_kernels():
    cycle = find_cycle(import_graph("ree_kernels"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_in_ree():
    cycle = find_cycle(import_graph("ree"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ree_imports_only_run_down_its_layers():
    upward = [f"{module} ({REE_LAYERS[layer_of(module)][0]}) imports {target} ({REE_LAYERS[layer_of(target)][0]})"
              for module, targets in sorted(import_graph("ree").items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_ree_kernels_never_imports_ree():
    users = [str(path.relative_to(ROOT)) for path in package_modules("ree_kernels").values()
             if imported_modules("ree_kernels", path, package_modules("ree"))]
    assert not users, f"ree_kernels modules that import the training package: {users}"


def test_no_function_is_longer_than_the_limit():
    long = []
    for folder in FUNCTION_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_checks_see_what_they_must_refuse():
    """The helpers above find a deferred import, a cycle and an upward import (so a green run means
    the tree has none, not that the checks are blind)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph("ree")
    assert "ree.cli" in graph["ree.entry"]  # imported inside main()
    assert "ree_kernels.triton" in import_graph("ree_kernels")["ree_kernels.loading"]  # importlib.import_module
    assert layer_of("ree.data.lfw") < layer_of("ree.models.iresnet") < layer_of("ree.train") < layer_of("ree.cli")
