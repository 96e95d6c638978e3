"""The import graph of one package, deferred (function-level) imports included, and its cycles.

`import_graph("ree_kernels")` or `import_graph("python/ree")` reads every module of the package
with `ast` (nothing is imported) and returns {module: {modules of the same package it imports}}.
An edge counts wherever the import statement stands: at the top, inside a function, under
`if TYPE_CHECKING`, and `importlib.import_module("<literal>")` as well. `from a import b` is an
edge to module `a.b` when that is a module, else to `a`; `import a.b` of a name that is no Python
module of the package (the compiled extension `ree_kernels._C`) is no edge. Run as a script, it prints the cycles of
the packages it is given and exits 1 if there is one:

    python .ci/import_graph.py ree_kernels python/ree
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, level: int, current: str, is_package: bool) -> str:
    """The absolute name of `from <.. name> import` in module `current`."""
    if level == 0:
        return name
    base = current.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([name] if name else []))


def _imported(tree: ast.AST, current: str, is_package: bool, modules: Set[str]) -> Iterator[str]:
    """Every module of `modules` that `current` imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node.module or "", node.level, current, is_package)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                target = child if child in modules else source
                if target in modules:
                    yield target
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and node.args[0].value in modules):
            yield node.args[0].value


def import_graph(package_dir: str) -> Dict[str, Set[str]]:
    """{module: the modules of the same package it imports}, for the package at `package_dir`
    (a directory holding __init__.py; its name is the package's).

    Raises:
        FileNotFoundError: package_dir has no __init__.py.
        SyntaxError: a module does not parse.
    """
    root = Path(package_dir).resolve()
    if not (root / "__init__.py").is_file():
        raise FileNotFoundError(f"{package_dir} is not a package (no __init__.py)")
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = set(_imported(tree, name, path.name == "__init__.py", modules)) - {name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every
    import cycle lies within one of them."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def main(package_dirs: List[str]) -> int:
    status = 0
    for package_dir in package_dirs:
        found = cycles(import_graph(package_dir))
        for component in found:
            print(f"{package_dir}: import cycle among {len(component)} modules: {', '.join(component)}")
        if not found:
            print(f"{package_dir}: no import cycle")
        status |= bool(found)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["ree_kernels", "python/ree"]))
