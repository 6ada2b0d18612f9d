"""The package's layout: no import circles (type-only and function-level imports included), few loose
top-level modules, one home for VAE tiling and for TAESD. Read from the source with `ast`: nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"sd35m_mlx": ROOT / "sd35m_mlx", "sd35m_mlx_cli": ROOT / "cli"}
MAX_TOP_LEVEL_MODULES = 9  # loose modules at the top of sd35m_mlx/, __init__.py not counted


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package's own name -> its __init__)."""
    folder = PACKAGES[package]
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file: at the top, under TYPE_CHECKING, in functions.

    `from X import y` counts as importing X.y when that is a module, else X itself."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here[: len(here) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != name}


def import_graph(package: str) -> dict[str, set[str]]:
    found = modules(package)
    known = set(found)
    return {name: imported(name, path, known) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_within(graph, component) for component in components]


def _path_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), ending where it starts."""
    start = min(component)
    previous = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


@pytest.mark.parametrize("package", ["sd35m_mlx", "sd35m_mlx_cli"])
def test_no_import_circles(package):
    found = cycles(import_graph(package))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_cycle_finder_names_a_circle_and_ignores_a_chain():
    """The finder itself: a three-module circle is reported as a path back to its start; a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_type_only_and_function_level_imports_count(tmp_path):
    """Imports under TYPE_CHECKING and inside functions are edges too (the circles they hide are still circles)."""
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    known = {"p", "p.a", "p.b"}
    assert imported("p.a", tmp_path / "a.py", known) == {"p.b"}
    assert imported("p.b", tmp_path / "b.py", known) == {"p.a"}


def rooms_imported(graph: dict[str, set[str]], room: str) -> set[str]:
    """The other rooms (sd35m_mlx.<first part>) that the modules of `room` import."""
    inside = f"sd35m_mlx.{room}"
    return {
        ".".join(t.split(".")[:2])
        for m, targets in graph.items()
        if m == inside or m.startswith(inside + ".")
        for t in targets
        if t != inside and not t.startswith(inside + ".")
    }


def test_models_import_no_other_room_and_sampling_reads_no_files():
    """models/ is pure mlx.nn; sampling/ never reaches up into loading/ (the loader builds the schedule). Both may
    read defaults.py, the MLX-free constants at the bottom of the house."""
    graph = import_graph("sd35m_mlx")
    assert rooms_imported(graph, "models") <= {"sd35m_mlx.defaults"}
    assert rooms_imported(graph, "sampling") <= {"sd35m_mlx.images", "sd35m_mlx.defaults"}


def test_few_loose_modules_at_the_top():
    # __init__.py and __main__.py (`python -m sd35m_mlx`) are the package's doors, not rooms
    top = sorted(p.name for p in PACKAGES["sd35m_mlx"].glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} loose modules at the top of sd35m_mlx/: {top}"


def test_one_home_for_vae_tiling_and_taesd_decoding():
    files = list(PACKAGES["sd35m_mlx"].rglob("*.py"))
    assert [p.relative_to(ROOT).as_posix() for p in files if p.name == "vae_tiling.py"] == [
        "sd35m_mlx/models/vae_tiling.py"
    ]
    assert not [p for p in files if p.name == "taesd_decode.py"]
