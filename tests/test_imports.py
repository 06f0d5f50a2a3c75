"""No module of tempme_fast imports one that imports it back, directly or through others, at the top
of the file or lazily inside a function: the graph is read from every module's syntax tree, so an
import that only runs on some path counts as much as one that runs at import time."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PACKAGE = "tempme_fast"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_names(root: Path) -> Dict[str, Path]:
    """``{"tempme_fast.ops.reference": path, "tempme_fast.ops": .../ops/__init__.py, ...}``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its file.

    ``from X import name`` is an edge to ``X.name`` when that is a module, else to ``X``; the package
    that holds a module is not an edge by itself (Python runs it first, but it imports its children,
    not the other way round).
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != module)
    return found


def import_graph(root: Path = ROOT) -> Dict[str, Set[str]]:
    names = _module_names(root)
    return {name: _imported(name, path, set(names)) for name, path in names.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search, three colours)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "tempme_fast.ops.reference" in graph["tempme_fast.ops"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lazy_and_relative_imports_are_edges(tmp_path):
    """The walker sees an import inside a function, ``from . import x`` and ``from ..x import y``."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert graph == {PACKAGE: {f"{PACKAGE}.a"}, f"{PACKAGE}.a": {f"{PACKAGE}.sub.b"}, f"{PACKAGE}.sub": set(),
                     f"{PACKAGE}.sub.b": {f"{PACKAGE}.a", f"{PACKAGE}.sub.c"}, f"{PACKAGE}.sub.c": set()}
    assert find_cycle(graph) == [f"{PACKAGE}.a", f"{PACKAGE}.sub.b", f"{PACKAGE}.a"]


@pytest.mark.parametrize("graph, cyclic", [({"a": {"b"}, "b": {"c"}, "c": set()}, False),
                                            ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
                                            ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True)],
                         ids=["chain", "diamond", "loop"])
def test_find_cycle(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic
