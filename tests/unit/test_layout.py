"""The package's shape: no import cycles (imports inside functions count: a deferred import
hides a cycle, it does not remove it) and no source file over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "defectvlm"
MAX_LINES = 400


def _modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    found = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> set[str]:
    """The package modules an import statement loads: `from a import b` loads the module a.b
    when there is one, else a (or the package enclosing a name that is not a module)."""
    if isinstance(node, ast.Import):
        return {_enclosing(alias.name, modules) for alias in node.names}
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    submodules = {f"{base}.{alias.name}" for alias in node.names} & set(modules)
    return submodules or {_enclosing(base, modules)}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (top level, functions, classes)."""
    modules = _modules(src)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets |= _imported(node, module, path.name == "__init__.py", modules)
        graph[module] = targets - {module, None}
    return graph


def _enclosing(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan; the package is small enough to recurse
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_path_within(group, graph) for group in groups]


def _path_within(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        module = frontier.pop(0)
        for target in sorted(graph[module] & group):
            if target == start:
                return [*paths[module], start]
            if target not in paths:
                paths[target] = [*paths[module], target]
                frontier.append(target)
    raise AssertionError(f"no cycle through {start}")


def test_the_package_has_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (deferred imports included):\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_finder_sees_deferred_and_relative_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "sub" / "__init__.py").write_text("from .b import thing\n", encoding="utf-8")
    (package / "a.py").write_text("def f():\n    from defectvlm.sub import b\n", encoding="utf-8")
    (package / "sub" / "b.py").write_text("import os\n\n\ndef g():\n    from .. import a\n", encoding="utf-8")
    graph = import_graph(tmp_path)
    assert graph["defectvlm.a"] == {"defectvlm.sub.b"} and graph["defectvlm.sub"] == {"defectvlm.sub.b"}
    assert cycles(graph) == [["defectvlm.a", "defectvlm.sub.b", "defectvlm.a"]]


def test_no_source_file_is_over_400_lines():
    long = {
        str(path.relative_to(SRC.parent)): n
        for path in sorted(SRC.rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them by concept): {long}"
