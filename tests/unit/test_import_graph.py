"""The package's import graph: no cycle, and no edge upward from the store or the API.

Every import statement counts, also the ones under `if TYPE_CHECKING:` and
inside functions: a cycle hidden from the interpreter is still two modules
that cannot be understood, tested or replaced apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tickguard

PACKAGE = Path(tickguard.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The tickguard modules `name` imports (package __init__ files aside)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package.rsplit(".", node.level - 1)[0]
                base = f"{prefix}.{base}" if base else prefix
            # `from tickguard import api_client`: the names may be modules themselves.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for imported in targets:
            module = imported
            while module and module not in MODULES:
                module = module.rpartition(".")[0]
            if module and module != name and MODULES[module].name != "__init__.py":
                found.add(module)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_the_cycle_finder_finds_one() -> None:
    """The check above can fail: a graph with a cycle is caught, with its path."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def below(name: str, allowed: tuple[str, ...]) -> list[str]:
    """The imports of `name` outside the `allowed` modules and packages."""
    return sorted(
        target
        for target in GRAPH[name]
        if not any(target == a or target.startswith(a + ".") for a in allowed)
    )


def test_the_store_depends_only_on_the_core() -> None:
    """No edge upward from the store: no broker, feed, loop or API types in it."""
    assert below("tickguard.store", ("tickguard.core", "tickguard.errors", "tickguard.files")) == []


def test_the_api_sees_the_daemon_only_through_its_port() -> None:
    allowed = (
        "tickguard.core",
        "tickguard.errors",
        "tickguard.port",
        "tickguard.status",
        "tickguard.http_server",
        "tickguard.log_limit",
    )
    assert below("tickguard.api", allowed) == []
    assert below("tickguard.port", ("tickguard.core", "tickguard.status", "tickguard.store")) == []
    assert below("tickguard.status", ("tickguard.core",)) == []


def test_the_graph_sees_the_imports() -> None:
    """The graph is read right: known edges are there (else the checks above prove nothing)."""
    assert "tickguard.port" in GRAPH["tickguard.api"]
    assert "tickguard.api" in GRAPH["tickguard.app"]
    assert "tickguard.api_client" in GRAPH["tickguard.cli"]  # a function-local import
    assert "tickguard.core.orders" in GRAPH["tickguard.store"]
