"""caption_model's imports point one way: the graph of its modules, built from the source with function-level
imports included, has no cycle; and the model never imports training, the Hub publisher or the app."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "caption_model"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every caption_model module `path` imports anywhere in its source (top level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    graph = {}
    for file in files:
        name = module_name(file)
        edges = imported_modules(file, known)
        # importing a.b.c runs a/b/__init__ first: an edge too, unless that package encloses the importer
        # (then it is already being initialised, as the root package always is)
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for target in list(edges):
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in known} - own
        graph[name] = edges - own
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 15 and graph["caption_model.generation"]  # the graph was really built
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["caption_model.modeling"] = graph["caption_model.modeling"] | {"caption_model.generation"}
    cycle = find_cycle(graph)
    assert cycle and "caption_model.modeling" in cycle and "caption_model.generation" in cycle


def test_the_model_imports_nothing_above_it():
    graph = import_graph()
    below_model = reachable(graph, "caption_model.modeling")
    assert not {m for m in below_model if m.startswith(("caption_model.training", "caption_model.hub",
                                                        "caption_model.cpu", "caption_model.generation"))}
    assert not any(m.startswith("caption_model.training") for m in reachable(graph, "caption_model.captioner"))
