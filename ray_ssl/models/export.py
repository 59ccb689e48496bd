"""The exported backbone: one safetensors file plus a JSON sidecar that names the timm model.

A training run writes ``<run>/export/teacher_backbone.safetensors`` and ``teacher_backbone.json``
(``{"timm_name", "timm_kwargs", "weights", ...}``; ``ray_ssl.train.checkpoint.export_backbone``).
Any timm model saved this way loads here, so evaluation and curation work on exports of other
runs and of other tools alike. The checks import no torch; loading does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray_ssl.config import StorageConfig
from ray_ssl.errors import UserError
from ray_ssl.storage import Location, read_bytes, resolve

if TYPE_CHECKING:
    from torch import nn

EXPORT_DIR = "export"  # a run's export directory: <run>/export
EXPORT_WEIGHTS = "teacher_backbone.safetensors"
EXPORT_META = "teacher_backbone.json"
WEIGHTS_SUFFIX = ".safetensors"


class ExportError(UserError, ValueError):
    """An export that cannot be loaded; the message names the file and what to pass instead."""


@dataclass(frozen=True)
class ExportFiles:
    """The weights and the sidecar of one export."""

    weights: Location
    sidecar: Location


def export_files(uri: str, storage: StorageConfig | None = None) -> ExportFiles:
    """Where an export's files are: ``uri`` is the ``.safetensors`` file (its sidecar is the same
    name with ``.json``) or a directory holding ``teacher_backbone.json``."""
    if uri.endswith(WEIGHTS_SUFFIX):
        return ExportFiles(
            resolve(uri, storage), resolve(uri[: -len(WEIGHTS_SUFFIX)] + ".json", storage)
        )
    directory = resolve(uri, storage)
    sidecar = directory.join(EXPORT_META)
    try:
        weights = json.loads(read_bytes(sidecar)).get("weights", EXPORT_WEIGHTS)
    except (FileNotFoundError, ValueError, AttributeError):
        weights = EXPORT_WEIGHTS
    return ExportFiles(directory.join(weights), sidecar)


def read_export_meta(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The sidecar of an export, checked to name a timm model and to sit beside its weights."""
    files = export_files(uri, storage)
    hint = f"pass a '{WEIGHTS_SUFFIX}' file written by a ray-ssl run (or its export directory)"
    try:
        meta = json.loads(read_bytes(files.sidecar))
    except FileNotFoundError as err:
        raise ExportError(f"export {uri}: no sidecar {files.sidecar.uri}; {hint}") from err
    except ValueError as err:
        raise ExportError(f"export {uri}: sidecar {files.sidecar.uri} is not JSON ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("timm_name"), str):
        raise ExportError(f"export {uri}: sidecar {files.sidecar.uri} names no 'timm_name'; {hint}")
    if not files.weights.exists():
        raise ExportError(f"export {uri}: weights {files.weights.uri} not found; {hint}")
    return meta


def load_exported_backbone(uri: str, storage: StorageConfig | None = None) -> nn.Module:
    """``timm.create_model(timm_name, **timm_kwargs)`` from the sidecar, its weights loaded."""
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = read_export_meta(uri, storage)
    files = export_files(uri, storage)
    try:
        model = timm.create_model(
            meta["timm_name"], pretrained=False, **meta.get("timm_kwargs", {})
        )
        model.load_state_dict(load(read_bytes(files.weights)))
    except (RuntimeError, TypeError, SafetensorError) as err:
        raise ExportError(
            f"cannot load the export {files.weights.uri} as timm '{meta['timm_name']}' ({err})"
        ) from err
    return model
