"""The package's layering (DESIGN.md, "Floors"): no upward imports between packages, no cycles."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import ray_ssl

PACKAGE_ROOT = Path(ray_ssl.__file__).parent

# Floors import nothing above them; `methods` and `data` sit on the floors; `train` and
# `curation` on those; the entry points on top.
LEVEL: dict[str, int] = {
    "errors": 0,
    "config": 0,
    "storage": 0,
    "losses": 0,
    "models": 0,
    "memory_bank": 0,
    "eval": 0,
    "methods": 1,
    "data": 1,
    "train": 2,
    "curation": 2,
    "cli": 3,
    "tune": 3,
}


def _imported_packages(path: Path) -> set[str]:
    """Top-level `ray_ssl` packages or modules that the file at `path` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = node.module.split(".")
            if names[0] != "ray_ssl":
                continue
            if len(names) > 1:
                found.add(names[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "ray_ssl" and len(names) > 1:
                    found.add(names[1])
    return found


def package_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Edges between the top-level parts of the package, from every module's imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts == ("__init__",):
            continue
        source = parts[0]
        graph[source] |= _imported_packages(path) - {source}
    return graph


def test_every_part_of_the_package_has_a_level() -> None:
    parts = {
        path.stem if path.is_file() else path.name
        for path in PACKAGE_ROOT.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__")
        or (path.is_dir() and (path / "__init__.py").exists())
    }
    assert parts == set(LEVEL), f"give new parts a level in LEVEL: {parts ^ set(LEVEL)}"


def test_no_part_imports_a_part_above_it() -> None:
    upward = [
        f"{source} (level {LEVEL[source]}) imports {target} (level {LEVEL[target]})"
        for source, targets in package_graph().items()
        for target in targets
        if LEVEL[target] > LEVEL[source]
    ]
    assert not upward, upward


def test_the_package_graph_has_no_cycles() -> None:
    graph = package_graph()
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for target in graph.get(node, ()):
            visit(target, (*path, node))
        done.add(node)

    for node in list(graph):
        visit(node, ())


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    floor = tmp_path / "memory_bank"
    floor.mkdir()
    (floor / "__init__.py").write_text("")
    (floor / "bank.py").write_text("from ray_ssl.data.stream import build_train_dataset\n")
    assert package_graph(tmp_path) == {"memory_bank": {"data"}}
