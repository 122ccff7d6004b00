"""The shape of the code: no import circles (function-local imports included), the method
package knows nothing of the platform, and the platform reaches the method through one door."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"dinov3": REPO / "dinov3", "rayssl": REPO / "platform" / "rayssl"}
DOOR = "rayssl.method"


def modules():
    for pkg, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((pkg,) + tuple(p for p in parts if p != "__init__"))
            yield name, path


def first_party_imports(name: str, path: Path):
    """(imported module, line, at module level?) for every import of dinov3/rayssl in the file,
    inside functions too; ``from pkg import sub`` counts as importing ``pkg.sub`` when it is one."""
    known = {n for n, _ in modules()}
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in ROOTS and t != name:
                yield t, node.lineno, id(node) in top


def test_no_import_cycles_even_through_function_local_imports():
    graph = {name: {t for t, _, _ in first_party_imports(name, path)} for name, path in modules()}
    known = set(graph)

    def resolve(t):  # an import of a name inside a module: that module
        while t not in known and "." in t:
            t = t.rsplit(".", 1)[0]
        return t

    graph = {k: {resolve(t) for t in v} - {k} for k, v in graph.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    edges = {k: {t for t in v if not k.startswith(t + ".")} for k, v in graph.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n)


def test_method_never_imports_the_platform_and_the_platform_uses_one_door():
    for name, path in modules():
        for target, line, _ in first_party_imports(name, path):
            if name.startswith("dinov3"):
                assert not target.startswith("rayssl"), f"{path}:{line} imports {target}"
            elif name != DOOR:
                assert not target.startswith("dinov3"), f"{path}:{line} imports {target}: go through {DOOR}"
