"""The package's layering (DESIGN.md, "Floors"): no upward imports between packages, no cycles."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
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
    "paths": 0,
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


# -- methods are plug-ins (DESIGN.md "A method is a plug-in") --------------------------------------
REPO_ROOT = PACKAGE_ROOT.parent
METHOD_FREE_DIRS = (PACKAGE_ROOT / "train", PACKAGE_ROOT / "tune", REPO_ROOT / "jobs")
METHOD_SEAM_MODULES = {"base", "registry"}  # what train/tune/jobs may import from methods
HEAVY_PACKAGES = {"torch", "ray", "deepspeed", "numpy", "timm"}
SETTINGS_MAY_IMPORT = {"config", "errors", "methods"}  # methods: light helpers (checked below)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                nodes.add(id(body[0].value))
    return nodes


def method_mentions(path: Path, methods: set[str], presets: set[str]) -> list[str]:
    """Where the code of ``path`` names a method: imports of a method's module, identifiers
    containing a method's name, strings with a method name as a dotted, ``=`` or ``_`` part
    (``"franca.koleo_weight=0"``); docstrings and whole preset names (a job picks its preset,
    the preset picks the method) do not count."""
    tree = ast.parse(path.read_text())
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        words: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[:2] == ["ray_ssl", "methods"] and len(parts) > 2:
                if parts[2] not in METHOD_SEAM_MODULES:
                    found.append(f"{path.name}:{node.lineno} imports {node.module}")
        elif isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, ast.Attribute):
            words = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            words = [node.name]
        elif isinstance(node, ast.arg):
            words = [node.arg]
        elif isinstance(node, ast.alias):
            words = [node.asname or node.name]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings or node.value in presets:
                continue
            words = [w for w in re.split(r"[^A-Za-z0-9]+", node.value) if w]
        for word in words:
            hit = [m for m in methods if m in word.lower()]
            if hit:
                found.append(f"{path.name}:{getattr(node, 'lineno', '?')} names {hit[0]}: {word}")
    return found


def _method_names() -> set[str]:
    from ray_ssl.config import method_plugins

    return set(method_plugins())


def _preset_names() -> set[str]:
    from ray_ssl.config import available_presets

    return set(available_presets())


def test_train_tune_and_jobs_name_no_method() -> None:
    methods, presets = _method_names(), _preset_names()
    assert {"franca", "instdisc"} <= methods
    found = [
        mention
        for directory in METHOD_FREE_DIRS
        for path in sorted(directory.rglob("*.py"))
        for mention in method_mentions(path, methods, presets)
    ]
    assert not found, found


def test_the_checker_sees_a_method_name(tmp_path: Path) -> None:
    code = tmp_path / "loop.py"
    code.write_text(
        '"""Franca in a docstring is fine."""\n'
        "from ray_ssl.methods.franca import FrancaMethod\n"
        "steps = config.franca.freeze_last_layer_epochs\n"
        "overrides = ['franca.koleo_weight=0']\n"
        "preset = 'local'\n"
    )
    found = method_mentions(code, {"franca"}, {"local"})
    # The import, the imported name, the attribute and the override string.
    assert len(found) == 4, found


def test_method_settings_modules_are_light() -> None:
    """Every settings module loads with the config, before torch, DeepSpeed or Ray."""
    modules = sorted((PACKAGE_ROOT / "methods").glob("*_settings.py"))
    assert len(modules) >= len(_method_names())
    for path in modules:
        assert _imported_packages(path) <= SETTINGS_MAY_IMPORT, (
            path.name,
            _imported_packages(path),
        )
    code = (
        "import sys\n"
        "from ray_ssl.config import method_plugins\n"
        "assert method_plugins()\n"
        f"print(sorted(m for m in {sorted(HEAVY_PACKAGES)!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.stdout.strip() == "[]", out.stdout
