"""The layer order of docs/ARCHITECTURE.md holds in the code: no import cycle, no import running upward.

Every ``import`` in ``megatron_core/`` and ``specs/`` is read with ``ast`` (module level, function
bodies and ``TYPE_CHECKING`` blocks alike). The floor of each module comes from the table in
docs/ARCHITECTURE.md, so the document and the check cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_core", "specs")
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


# ----------------------------------------------------------------------------- the documented order
def parse_floors(text: str) -> dict[str, int]:
    """``{module name: floor}`` from the table rows ``| floor | part | `names` | ... |``."""
    floors: dict[str, int] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", cells[2]):
            if name in floors:
                raise ValueError(f"docs/ARCHITECTURE.md lists {name} twice (floors {floors[name]} and {cells[0]})")
            floors[name] = int(cells[0])
    if not floors:
        raise ValueError("docs/ARCHITECTURE.md has no layer table rows '| floor | part | `modules` | ... |'")
    return floors


def floor_of(module: str, is_package: bool, floors: dict[str, int]) -> int | None:
    """The floor of the most specific table name covering ``module`` (``X.__init__`` = package file only)."""
    if is_package and f"{module}.__init__" in floors:
        return floors[f"{module}.__init__"]
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in floors:
            return floors[name]
    return None


# ----------------------------------------------------------------------------- the code's imports
def discover(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under the packages."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, anywhere, with whether it sits under ``if TYPE_CHECKING:`` (never runs)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, type_only = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, type_only))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, True) for child in node.body)
            stack.extend((child, type_only) for child in node.orelse)
            continue
        stack.extend((child, type_only) for child in ast.iter_child_nodes(node))
    return found


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, type-only)`` for every import of one of our modules anywhere in ``path``."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []
    for node, type_only in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            # ``from pkg import sub`` imports the submodule when there is one, else a name of pkg.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                found.append((target, node.lineno, type_only))
    return found


Graph = dict[str, dict[str, tuple[int, bool]]]  # module -> {imported module: (first line, type-only)}


def import_graph(root: Path = ROOT) -> tuple[dict[str, Path], Graph]:
    """Our modules and, for each, what it imports: ``{module: {imported: (first line, type-only)}}``.

    An edge is type-only when every import of that module sits under ``if TYPE_CHECKING:``.
    """
    modules = discover(root, PACKAGES)
    graph: Graph = {}
    for module, path in modules.items():
        edges: dict[str, tuple[int, bool]] = {}
        for target, line, type_only in sorted(imports_of(module, path, modules), key=lambda edge: edge[1]):
            first_line, was_type_only = edges.get(target, (line, True))
            edges[target] = (first_line, was_type_only and type_only)
        graph[module] = edges
    return modules, graph


def runtime_edges(graph: Graph) -> dict[str, set[str]]:
    """The imports that run (``TYPE_CHECKING`` blocks never do, so they cannot close a cycle)."""
    return {module: {t for t, (_, type_only) in edges.items() if not type_only} for module, edges in graph.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
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
                    cycles.append(sorted(component))
    return cycles


def layer_violations(modules: dict[str, Path], graph: Graph,
                     floors: dict[str, int]) -> tuple[list[str], list[str]]:
    """(modules the table does not cover, imports that run up the table), as readable lines."""
    def floor(name: str) -> int | None:
        return floor_of(name, modules[name].name == "__init__.py", floors)

    uncovered = [name for name in sorted(modules) if floor(name) is None]
    upward = []
    for source in sorted(graph):
        for target, (line, _) in sorted(graph[source].items()):
            low, high = floor(source), floor(target)
            if low is not None and high is not None and high > low:
                rel = modules[source].relative_to(ROOT) if modules[source].is_relative_to(ROOT) else modules[source]
                upward.append(f"{rel}:{line}: {source} (floor {low}) imports {target} (floor {high})")
    return uncovered, upward


# ----------------------------------------------------------------------------- the checks
def test_no_import_cycles() -> None:
    _, graph = import_graph()
    cycles = find_cycles(runtime_edges(graph))
    assert not cycles, "import cycles (each a group of modules importing each other around a loop):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    ) + "\nFix: move the shared code down a floor, or import it from where it lives."


def test_imports_follow_the_layer_order() -> None:
    modules, graph = import_graph()
    uncovered, upward = layer_violations(modules, graph, parse_floors(ARCHITECTURE.read_text()))
    assert not uncovered, (
        f"modules not placed on any floor of the table in {ARCHITECTURE.relative_to(ROOT)}: {uncovered}; "
        "add them to the table"
    )
    assert not upward, "imports against the layer order of docs/ARCHITECTURE.md:\n" + "\n".join(upward)


def test_table_names_exist() -> None:
    modules = discover(ROOT, PACKAGES)
    floors = parse_floors(ARCHITECTURE.read_text())
    missing = [name for name in floors if name.removesuffix(".__init__") not in modules]
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


# ----------------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_sees_cycles_inside_functions_and_relative_imports(tmp_path: Path) -> None:
    _write(tmp_path, {
        "megatron_core/__init__.py": "",
        "megatron_core/low.py": "def f():\n    from megatron_core import high\n",
        "megatron_core/high.py": "from . import low\n",
        "megatron_core/other.py": "import megatron_core.low\n",
        "megatron_core/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megatron_core import other\n",
        "specs/__init__.py": "",
    })
    modules, graph = import_graph(tmp_path)
    assert graph["megatron_core.low"] == {"megatron_core.high": (2, False)}
    assert graph["megatron_core.high"] == {"megatron_core.low": (1, False)}
    assert find_cycles(runtime_edges(graph)) == [["megatron_core.high", "megatron_core.low"]]
    floors = parse_floors("| 1 | a | `megatron_core.low`, `megatron_core.__init__` | x |\n"
                          "| 2 | b | `megatron_core.high` | y |\n")
    uncovered, upward = layer_violations(modules, graph, floors)
    assert uncovered == ["megatron_core.other", "megatron_core.typed", "specs"]
    assert len(upward) == 1 and "megatron_core.low (floor 1) imports megatron_core.high (floor 2)" in upward[0]


def test_type_checking_imports_count_for_floors_but_cannot_close_a_cycle(tmp_path: Path) -> None:
    _write(tmp_path, {
        "megatron_core/__init__.py": "",
        "megatron_core/low.py": "import typing\nif typing.TYPE_CHECKING:\n    from megatron_core.high import X\n",
        "megatron_core/high.py": "from megatron_core import low\n",
        "specs/__init__.py": "",
    })
    modules, graph = import_graph(tmp_path)
    assert graph["megatron_core.low"] == {"megatron_core.high": (3, True)}
    assert find_cycles(runtime_edges(graph)) == []
    floors = parse_floors("| 1 | a | `megatron_core.low`, `megatron_core.__init__`, `specs` | x |\n"
                          "| 2 | b | `megatron_core.high` | y |\n")
    _, upward = layer_violations(modules, graph, floors)
    assert len(upward) == 1 and "megatron_core.low (floor 1) imports megatron_core.high (floor 2)" in upward[0]


@pytest.mark.parametrize("row", ["| 1 | a | `x` | y |\n| 2 | b | `x` | z |\n", "no table here\n"])
def test_table_parsing_refuses_duplicates_and_empty(row: str) -> None:
    with pytest.raises(ValueError, match="ARCHITECTURE"):
        parse_floors(row)
