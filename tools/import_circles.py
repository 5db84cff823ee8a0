"""Import circles among a package's modules: ``python tools/import_circles.py [PACKAGE_DIR] [--top]``.

Every relative import counts (also the ones inside functions, which break no import but still tie two modules to
each other), or with ``--top`` only the module-level ones. Prints the module count and each circle (a strongly
connected component of the import graph); exits 1 when there is one. tests/test_layout.py keeps iddm_core at 0.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_files(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for path in package_dir.rglob("*.py"):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        is_init = rel.name == "__init__"
        found[".".join(rel.parts[:-1] if is_init else rel.parts)] = (path, is_init)
    return found


def _target(module: str, is_init: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_init else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + (name.split(".") if name else []))


def import_graph(package_dir: Path, top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports relatively (a module's own parent packages left out)."""
    modules = module_files(package_dir)
    graph = {}
    for module, (path, is_init) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        statements = tree.body if top_level_only else ast.walk(tree)
        targets = set()
        for node in statements:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = _target(module, is_init, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[module] = {t for t in targets if t in modules and t != module and not module.startswith(t + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--top"]
    package_dir = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "iddm_core"
    graph = import_graph(package_dir, top_level_only="--top" in argv)
    found = circles(graph)
    print(f"{len(graph)} modules, {len(found)} import circles")
    for component in found:
        print("  " + " <-> ".join(component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
