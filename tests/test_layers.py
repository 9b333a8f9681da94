"""The package's imports point one way, down the layers, with no cycles and no imports hidden in
functions: read from the source with ``ast``, nothing imported."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_align"

LAYERS = {
    "errors": 0,
    "settings": 1,
    "runtime": 1,
    "report": 2,
    "losses": 1,
    "data": 2,
    "model": 3,
    "online": 4,
    "rewards": 5,
    "methods": 5,
    "callbacks": 6,
    "commands": 7,
    "cli": 8,
}
"""Each part of the package and its layer: a module may import its own part and parts of lower
layers only (data <- model <- online <- methods <- callbacks <- commands <- cli; errors, settings,
runtime and the pure losses beneath them all; report, what a run leaves for a person to read,
beside data; rewards, the shipped reward functions under one import path, beside methods)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str | None:
    """``lit_align.model.backbone`` -> ``model``; the package's own ``__init__`` has no part."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


def lit_align_imports(tree: ast.Module, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of lit_align in ``tree``;
    ``from lit_align.x import name`` counts as an import of ``lit_align.x.name`` when that is a
    module, else of ``lit_align.x``."""
    found = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lit_align") and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                target = candidate if resolve(candidate) else node.module
                found.append((target, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [
                (alias.name, node.lineno, id(node) in top_level)
                for alias in node.names
                if alias.name.startswith("lit_align")
            ]
    return found


def resolve(module: str) -> Path | None:
    relative = Path(*module.split("."))
    for path in (PACKAGE.parent / relative.with_suffix(".py"), PACKAGE.parent / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


SOURCES = {module_name(path): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {module: {target for target, _, _ in lit_align_imports(tree, module)} for module, tree in SOURCES.items()}


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module) for module in SOURCES} - {None}
    assert parts == set(LAYERS), (
        f"parts without a layer: {parts - set(LAYERS)}; layers without a part: {set(LAYERS) - parts}"
    )


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_point_down_the_layers(module):
    part = part_of(module)
    if part is None:
        return
    upward = [
        (target, line)
        for target, line, _ in lit_align_imports(SOURCES[module], module)
        if part_of(target) not in (None, part) and LAYERS[part_of(target)] >= LAYERS[part]
    ]
    assert not upward, f"{module} ({part}, layer {LAYERS[part]}) imports from the same or a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_imports_inside_functions(module):
    """Every lit_align import is at module level (none kept in a function or under
    ``TYPE_CHECKING`` to dodge a cycle)."""
    hidden = [(target, line) for target, line, top in lit_align_imports(SOURCES[module], module) if not top]
    assert not hidden, f"{module} imports inside a function or block: {hidden}"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of ``graph`` found by a depth-first search (a back edge closes one)."""
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycles():
    """Module-level imports form no cycle (the package's ``__init__`` files, which re-export, are
    followed like any module)."""
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checks_catch_what_they_look_for():
    """The checks themselves on made-up sources: an upward import, a hidden import and a cycle
    are each found."""
    upward = ast.parse("from lit_align.methods.dpo import DPO\n")
    assert [t for t, _, _ in lit_align_imports(upward, "lit_align.data.x")] == ["lit_align.methods.dpo"]
    hidden = ast.parse("def f():\n    from lit_align.errors import SettingError\n")
    assert [top for _, _, top in lit_align_imports(hidden, "lit_align.data.x")] == [False]
    typing_only = ast.parse("if TYPE_CHECKING:\n    from lit_align.model.backbone import Backbone\n")
    assert [top for _, _, top in lit_align_imports(typing_only, "lit_align.model.reference")] == [False]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
