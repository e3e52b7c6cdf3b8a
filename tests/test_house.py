"""The shape of the house: no import cycles, rooms of at most 400 lines, and every private
Keras or TensorFlow name behind `replicate/_keras_compat.py`."""

import ast
from pathlib import Path

import pytest

import replicate

PACKAGE = Path(replicate.__file__).parent
MAX_LINES = 400
COMPAT = "replicate._keras_compat"
# Private names of the standard library that replicate uses on purpose.
STDLIB_PRIVATE = {("sys", "_current_frames"), ("os", "_exit")}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST):
    """Every node, leaving out `if TYPE_CHECKING:` blocks (they never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _imports(name: str, path: Path) -> set[str]:
    """The replicate modules `name` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != "replicate" and t != name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    assert _cycle() is None, " -> ".join(_cycle())


def test_the_import_walk_sees_what_modules_import():
    # The walk itself must find real edges, or the cycle test proves nothing.
    assert "replicate.backends" in GRAPH["replicate.data"]
    assert "replicate.backends.base" in GRAPH["replicate.backends"]
    assert "replicate.watchdog" in GRAPH["replicate.backends.base"]
    assert "replicate.tower" in GRAPH["replicate.builder"]
    assert "replicate.resume" in GRAPH["replicate.processes"]  # imported inside a function


def test_engines_do_not_reach_up():
    above = {"replicate.processes", "replicate.model", "replicate.steps", "replicate.data"}
    for name, imported in GRAPH.items():
        if name.startswith("replicate.backends"):
            assert not imported & above, (name, imported & above)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_rooms_are_at_most_400_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines"


def _private_uses(path: Path) -> list[str]:
    found = []
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(("keras.src", "tensorflow.python", "tensorflow.core")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute):
            attr = node.attr
            if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
                if attr != "__internal__":
                    continue
            owner = node.value
            if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
                continue
            if isinstance(owner, ast.Name):
                if owner.id in ("self", "cls") or (owner.id, attr) in STDLIB_PRIVATE:
                    continue
            found.append(f"line {node.lineno}: .{attr}")
    return found


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith(COMPAT)))
def test_private_names_only_in_the_compatibility_module(name):
    assert _private_uses(MODULES[name]) == []


def test_the_private_name_check_finds_them():
    # The one package allowed to hold them.
    assert _private_uses(MODULES[f"{COMPAT}.keras_internals"])
    assert _private_uses(MODULES[f"{COMPAT}.tensorflow_internals"])
