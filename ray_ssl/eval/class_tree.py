"""A class hierarchy for the global-structure metric: leaves are class names, read from YAML.

The file is a list of nodes; a node is a class name (a leaf) or a one-key mapping from a group
name to its list of nodes. The root's children are the superclasses (a leaf child is its own).
``trees/fashion_mnist.yaml`` ships with the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ray_ssl.errors import UserError

TREE_DIR = Path(__file__).parent / "trees"


class ClassTreeError(UserError, ValueError):
    """A class tree file that cannot be read or does not match the data's classes."""


@dataclass(frozen=True)
class ClassTree:
    """Each leaf's path of group names from the root, e.g. ``("tops", "Shirt")``."""

    paths: dict[str, tuple[str, ...]]

    def superclass(self, name: str) -> str:
        return self.paths[name][0]

    @property
    def height(self) -> int:
        return max(len(path) for path in self.paths.values())

    def distance(self, a: str, b: str) -> int:
        """The tree's cophenetic distance: the height of the leaves' lowest common ancestor.

        The tree read as a dendrogram with every leaf at height 0 and the root at the tree's
        height, so siblings under a group are closer than any two leaves joined only at the root
        (path length would put two leaves hung directly from the root as close as siblings).
        """
        if a == b:
            return 0
        pa, pb = self.paths[a], self.paths[b]
        common = 0
        while common < min(len(pa), len(pb)) and pa[common] == pb[common]:
            common += 1
        return self.height - common

    def distance_matrix(self, classes: list[str]) -> np.ndarray:
        """Tree distances [C, C] between ``classes`` (each must be a leaf)."""
        missing = [c for c in classes if c not in self.paths]
        if missing:
            raise ClassTreeError(
                f"classes {missing} are not leaves of the class tree; its leaves are "
                f"{sorted(self.paths)}"
            )
        return np.array([[self.distance(a, b) for b in classes] for a in classes])


def _walk(nodes: Any, prefix: tuple[str, ...], paths: dict[str, tuple[str, ...]]) -> None:
    if not isinstance(nodes, list):
        raise ClassTreeError(f"class tree node under {list(prefix) or 'the root'} must be a list")
    for node in nodes:
        if isinstance(node, str):
            if node in paths:
                raise ClassTreeError(f"class '{node}' appears twice in the class tree")
            paths[node] = (*prefix, node)
        elif isinstance(node, dict) and len(node) == 1:
            ((name, children),) = node.items()
            _walk(children, (*prefix, str(name)), paths)
        else:
            raise ClassTreeError(
                f"class tree entry {node!r} must be a class name or a one-key mapping "
                "group: [children]"
            )


def shipped_trees() -> list[str]:
    """Names of the class trees that ship with the package."""
    return sorted(p.stem for p in TREE_DIR.glob("*.yaml"))


def load_class_tree(name_or_path: str) -> ClassTree:
    """A shipped tree by name (``fashion_mnist``) or any tree file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = TREE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ClassTreeError(
            f"no class tree '{name_or_path}'; pass a YAML file or one of "
            f"{', '.join(shipped_trees())}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ClassTreeError(f"class tree {path} is not valid YAML: {err}".splitlines()[0]) from err
    paths: dict[str, tuple[str, ...]] = {}
    _walk(data, (), paths)
    if not paths:
        raise ClassTreeError(f"class tree {path} has no classes")
    return ClassTree(paths)
