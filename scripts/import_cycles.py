#!/usr/bin/env python3
"""Find import cycles among pyvmm's modules: `scripts/import_cycles.py [--all]`.

Reads src/pyvmm with `ast` (nothing is imported). By default it follows module-level imports,
the ones that run when a module is loaded (an `if TYPE_CHECKING:` block does not count);
`--all` also follows the imports inside functions, which run later but still tie the
modules' layers together. Prints each cycle (one strongly connected component, with one
cycle through it) and exits 1 if there is any, 0 if there is none.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "pyvmm"


def module_names(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    names = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, everywhere: bool):
    """Import statements that run when the module loads (or at any time, with `everywhere`).
    Imports under `if TYPE_CHECKING:` never run and are left out."""
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
        elif everywhere or isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While, ast.ExceptHandler, ast.ClassDef)):
            # module level: only the blocks that run as the module loads (class bodies do), not function bodies
            pending.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)
                           or isinstance(child, ast.ExceptHandler))


def imports_of(name: str, path: Path, modules: dict[str, Path], everywhere: bool) -> set[str]:
    """The package's modules that `name` imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(tree, everywhere):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.add(alias.name)
            continue
        if node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            if submodule in modules:
                found.add(submodule)
            elif target in modules:
                found.add(target)
    found.discard(name)
    return found


def import_graph(everywhere: bool = False, src: Path = SRC) -> dict[str, set[str]]:
    modules = module_names(src)
    return {name: imports_of(name, path, modules, everywhere) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(start: str) -> None:  # Tarjan, iteratively (no recursion limit)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    previous = {start: None}
    queue = [start]
    for node in queue:
        for child in sorted(graph[node] & component):
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return sorted(component)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also follow imports inside functions")
    args = parser.parse_args(argv)
    found = cycles(import_graph(everywhere=args.all))
    for cycle in found:
        print(" -> ".join(cycle))
    kind = "imports anywhere" if args.all else "module-level imports"
    print(f"{len(found)} import cycle(s) in {PACKAGE} ({kind})", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
