"""The one-way layering of the package, read from the source: no import cycle (function-level imports
count; imports only a type checker runs do not), no library module importing the CLI or a command
module, and the rooms that must stay low (the registry, the methods) importing nothing above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "peftkit"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs, at any depth, leaving out `if TYPE_CHECKING:` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. `from X import a` is an edge to X.a when that is a
    module, else to X (a package's __init__, which the import runs)."""
    files = {module_name(p, src): p for p in (src / PACKAGE).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [
                    f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in files else origin
                    for alias in node.names
                ]
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def is_command_layer(module: str) -> bool:
    """The CLI and the command modules: the top of the package, which nothing below imports."""
    return module == f"{PACKAGE}.cli" or module.startswith(f"{PACKAGE}.cli.") or module.endswith(".commands")


GRAPH = import_graph()


def test_the_graph_reads_the_package_and_sees_function_level_imports():
    assert len(GRAPH) > 100
    # core.adapted imports the methods at module level and the fingerprint function inside a method
    assert {f"{PACKAGE}.methods", f"{PACKAGE}.base.fingerprint"} <= GRAPH[f"{PACKAGE}.core.adapted"]


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
    )
    graph = import_graph(tmp_path)
    assert cycles(graph) == []  # c -> a only for the type checker
    (package / "c.py").write_text("import peftkit.a\n")
    assert cycles(import_graph(tmp_path)) == [[f"{PACKAGE}.a", f"{PACKAGE}.c", f"{PACKAGE}.sub.b"]]


def test_there_is_no_import_cycle():
    assert cycles(GRAPH) == [], "import cycles (each a list of the modules in one loop)"


def test_library_code_never_imports_the_cli_or_a_command_module():
    wrong = {
        module: sorted(t for t in targets if is_command_layer(t))
        for module, targets in GRAPH.items()
        if not is_command_layer(module) and module != PACKAGE + ".__main__"
    }
    assert {m: t for m, t in wrong.items() if t} == {}


@pytest.mark.parametrize(
    ("room", "may_import"),
    [
        # The registry stores and checks; it runs no model and no evaluation (policy sits above it).
        ("registry", ("errors", "io", "terminal", "values", "identity", "formats", "registry", "paths")),
        # Methods stand on the foundation, the base models, per-row choice, the prefix feeder and what a
        # base layer is; the adapted model, injection and the checks stand on them.
        (
            "methods",
            ("errors", "values", "base", "methods", "core.rows", "core.kv_prefix", "core.layer_types"),
        ),
    ],
)
def test_a_low_room_imports_nothing_above_it(room, may_import):
    allowed = tuple(f"{PACKAGE}.{m}" for m in may_import)
    above = {
        module: sorted(
            t for t in targets if not (t in allowed or t.startswith(tuple(a + "." for a in allowed)))
        )
        for module, targets in GRAPH.items()
        if module.startswith(f"{PACKAGE}.{room}.") and not is_command_layer(module)
    }
    assert {m: t for m, t in above.items() if t} == {}


def test_imports_by_name_are_only_the_known_ones():
    """`importlib.import_module` hides an edge from the graph: each use is listed here with its reason."""
    known = {
        f"{PACKAGE}.cli": "the command map names each command's module; only the chosen one is imported",
        f"{PACKAGE}.moved": "old module names resolve to the modules' new homes",
        f"{PACKAGE}.registry.store": "deprecated Registry.promote without a gate result (removed next release)",
    }
    users = {
        module_name(p)
        for p in (SRC / PACKAGE).rglob("*.py")
        if "import_module(" in p.read_text() or "__import__(" in p.read_text()
    }
    assert users <= set(known), f"new import by name in {sorted(users - set(known))}: list it here with why"


# The rooms, lowest first (docs/architecture.md draws them): a module may import its own room and the
# rooms below it. The CLI and command modules stand above all of them.
LAYERS = [
    ("foundation", "errors io values identity terminal version command_args config_files moved"),
    ("base, data", "base data paths"),
    ("what adapter layers read", "core.rows core.kv_prefix core.layer_types naming"),
    ("methods", "methods"),
    ("formats", "formats"),
    ("core, registry", "core registry"),
    ("tools, exports and the package's names", "tools export __init__"),
    ("train, eval", "train eval"),
    ("policy", "policy monitor"),
    ("experiments", "experiment"),
    ("serve, compare, tune", "serve compare tune"),
]


def layer_of(module: str) -> int:
    name = module.removeprefix(PACKAGE + ".") if module != PACKAGE else "__init__"
    best = None
    for level, (_, rooms) in enumerate(LAYERS):
        for room in rooms.split():
            if (name == room or name.startswith(room + ".")) and (best is None or len(room) > len(best[1])):
                best = (level, room)
    assert best is not None, f"{module} is in no layer: add its room to LAYERS"
    return best[0]


def test_every_import_points_down_the_layers():
    upward = sorted(
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in GRAPH.items()
        if not is_command_layer(module) and module != PACKAGE + ".__main__"
        for target in targets
        if not is_command_layer(target) and layer_of(target) > layer_of(module)
    )
    assert upward == []


@pytest.mark.parametrize(("old", "new"), sorted(__import__("peftkit.moved").moved.MOVED.items()))
def test_an_old_module_name_imports_the_moved_module_and_warns(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new) and module.__spec__.name == new
