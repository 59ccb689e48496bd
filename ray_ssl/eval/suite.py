"""``ray-ssl eval``: the evaluation suite of an exported backbone.

Frozen features of ``eval.knn_max_train`` labelled images of the training split and
``eval.knn_max_test`` of the test split (samples labelled -1 are left out and counted) feed:
weighted kNN for every k in ``eval.knn_ks`` (:mod:`ray_ssl.eval.knn`), the linear probe as a Ray
Train job (:mod:`ray_ssl.eval.linear`), and PCA pictures of the patch tokens of the first
``eval.pca_images`` test images (:mod:`ray_ssl.eval.pca`). With a RASA basis the patch tokens
have it removed first (CLS untouched). ``eval.json`` and ``pca.png`` are written to
:func:`eval_output_uri`. The shards are read by a loader the caller passes in (the data plane's
``load_labelled_arrays``): this floor module imports no data code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_ssl.config import Config, ConfigError, StorageConfig, to_dict
from ray_ssl.errors import UserError
from ray_ssl.models.export import EXPORT_DIR, export_files, read_export_meta
from ray_ssl.storage import Location, resolve, write_bytes_atomic

log = logging.getLogger(__name__)

REPORT_FILE = "eval.json"
PCA_FILE = "pca.png"
EVAL_DIR = "eval"
UNKNOWN_LABEL = -1
STRUCTURE_POINTS_PER_CENTROID = 4  # each half of the test set holds >= 2 points per centroid

# (uri, storage, limit, size) -> (uint8 images [N, size, size, C], int64 labels [N], idx [N])
ImageLoader = Callable[
    [str, StorageConfig, int | None, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]
]


class EvalError(UserError, ValueError):
    """Inputs the evaluation cannot use; the message says which and what to do."""


@dataclass(frozen=True)
class EvalOutcome:
    """Where the suite wrote its files, and the report it wrote."""

    output_uri: str
    report_uri: str
    pca_uri: str | None
    report: dict[str, Any]


def eval_output_uri(export_uri: str, config: Config) -> str:
    """``eval.output_uri`` if set; else ``<run>/eval`` for an export in a run's ``export/``
    directory, else an ``eval`` directory beside the export."""
    if config.eval.output_uri:
        return config.eval.output_uri
    weights = export_files(export_uri, config.storage).weights
    directory = posixpath.dirname(weights.path.rstrip("/"))
    if posixpath.basename(directory) == EXPORT_DIR:
        directory = posixpath.dirname(directory)
    base = Location(weights.fs, directory, weights.scheme)
    return base.join(EVAL_DIR).uri


def check_settings(config: Config) -> None:
    """The suite's settings, checked before anything heavy is imported."""
    e = config.eval
    problems = [
        (not e.knn_ks or min(e.knn_ks) < 1, f"eval.knn_ks={list(e.knn_ks)} must be k >= 1"),
        (e.knn_temperature <= 0, f"eval.knn_temperature={e.knn_temperature} must be > 0"),
        (not e.linear_lrs or min(e.linear_lrs) <= 0, "eval.linear_lrs must be > 0"),
        (e.linear_epochs < 1, f"eval.linear_epochs={e.linear_epochs} must be >= 1"),
        (e.linear_batch_size < 1, f"eval.linear_batch_size={e.linear_batch_size} must be >= 1"),
        (not 0 < e.linear_holdout < 1, f"eval.linear_holdout={e.linear_holdout} is not in (0, 1)"),
        (e.linear_workers < 1, f"eval.linear_workers={e.linear_workers} must be >= 1"),
        (e.pca_images < 0, f"eval.pca_images={e.pca_images} must be >= 0"),
        (e.knn_max_train < 2, f"eval.knn_max_train={e.knn_max_train} must be >= 2"),
        (e.knn_max_test < 1, f"eval.knn_max_test={e.knn_max_test} must be >= 1"),
        (e.feature_batch_size < 1, "eval.feature_batch_size must be >= 1"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def check_inputs(export_uri: str, rasa_uri: str | None, config: Config) -> dict[str, Any]:
    """Settings, the export's sidecar and weights, the RASA file: no torch needed. Returns the
    export's sidecar."""
    check_settings(config)
    meta = read_export_meta(export_uri, config.storage)
    if rasa_uri is not None and not resolve(rasa_uri, config.storage).exists():
        raise EvalError(f"RASA basis {rasa_uri} not found; write one with `ray-ssl rasa EXPORT`")
    return meta


def _labelled(labels: np.ndarray, split: str, uri: str) -> np.ndarray:
    keep = labels != UNKNOWN_LABEL
    if not keep.any():
        raise EvalError(
            f"no labelled samples in the {split} split {uri}; kNN and the linear probe need "
            "shards with a cls field"
        )
    return keep


def _input_side(model: Any) -> int:
    """The square input side the model was built for (a ViT's patch embedding knows it)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size:
        return int(img_size[0])
    import timm

    return int(timm.data.resolve_data_config({}, model=model)["input_size"][-1])


def _input_channels(model: Any) -> int:
    import torch

    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else 3


def _preprocess(in_chans: int) -> Callable:
    """uint8 [B, C, H, W] -> the model's channels, normalised as in training."""
    from ray_ssl.models.vit import normalize_images

    def preprocess(images: Any) -> Any:
        if images.shape[1] != in_chans:  # gray <-> RGB
            images = (
                images.float().mean(1, keepdim=True).round().to(images.dtype)
                if in_chans == 1
                else images.expand(-1, in_chans, -1, -1)
            )
        return normalize_images(images)

    return preprocess


def run_eval(
    config: Config,
    export_uri: str,
    data_uri: str,
    eval_data_uri: str,
    load_images: ImageLoader,
    rasa_uri: str | None = None,
    structure: StructureRequest | None = None,
) -> EvalOutcome:
    """Evaluate the export at ``export_uri``; see the module docstring."""
    meta = check_inputs(export_uri, rasa_uri, config)
    out_uri = eval_output_uri(export_uri, config)
    import torch

    from ray_ssl.eval.features import extract_features
    from ray_ssl.eval.knn import weighted_knn_accuracies
    from ray_ssl.eval.linear import ProbeSettings, feature_sets, run_linear_probe
    from ray_ssl.models.export import load_exported_backbone

    e, storage = config.eval, config.storage
    use_gpu = config.train.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    model = load_exported_backbone(export_uri, storage).eval().to(device)
    side = _input_side(model)
    train_images, train_labels, _ = load_images(data_uri, storage, e.knn_max_train, side)
    test_images, test_labels, _ = load_images(eval_data_uri, storage, e.knn_max_test, side)
    train_keep = _labelled(train_labels, "training", data_uri)
    test_keep = _labelled(test_labels, "test", eval_data_uri)
    basis = None
    if rasa_uri is not None:
        from ray_ssl.eval.rasa import load_rasa_basis

        basis = load_rasa_basis(rasa_uri, storage)
    preprocess = _preprocess(_input_channels(model))

    def features(images: np.ndarray, patch_tokens: bool = False) -> Any:
        return extract_features(
            model, images, e.feature_batch_size, device, preprocess, patch_tokens, basis, True
        )

    train = features(train_images[train_keep])
    test = features(test_images[test_keep])
    y_train = torch.from_numpy(train_labels[train_keep])
    y_test = torch.from_numpy(test_labels[test_keep])
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    knn = weighted_knn_accuracies(
        train.cls, y_train, test.cls, y_test, num_classes, e.knn_ks, e.knn_temperature
    )
    log.info("weighted kNN top-1: %s", {k: round(v, 4) for k, v in knn.items()})

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    settings = ProbeSettings(
        lrs=tuple(e.linear_lrs),
        epochs=e.linear_epochs,
        batch_size=e.linear_batch_size,
        holdout_fraction=e.linear_holdout,
        num_workers=e.linear_workers,
        use_gpu=use_gpu,
        seed=config.train.seed,
    )
    linear = run_linear_probe(
        feature_sets(train.cls, train.patch_mean),
        y_train,
        feature_sets(test.cls, test.patch_mean),
        y_test,
        num_classes,
        settings,
    )

    out = resolve(out_uri, storage)
    pca_uri, pca_count = None, min(e.pca_images, len(test_images))
    if pca_count:
        png = pca_grid(features(test_images[:pca_count], True).patches, test_images[:pca_count])
        write_bytes_atomic(out.join(PCA_FILE), png)
        pca_uri = out.join(PCA_FILE).uri
    report: dict[str, Any] = {
        "export": export_uri,
        "timm_name": meta["timm_name"],
        "data": data_uri,
        "eval_data": eval_data_uri,
        "rasa_basis": rasa_uri,
        "image_side": side,
        "samples": {
            "train": int(train_keep.sum()),
            "test": int(test_keep.sum()),
            "train_unlabelled_excluded": int((~train_keep).sum()),
            "test_unlabelled_excluded": int((~test_keep).sum()),
        },
        "num_classes": num_classes,
        "knn": {
            "temperature": e.knn_temperature,
            "features": "cls",
            "top1": {str(k): v for k, v in knn.items()},
        },
        "linear": linear,
        "pca": {"file": pca_uri, "images": pca_count},
        "config": {"eval": to_dict(config)["eval"], "seed": config.train.seed},
    }
    if structure is not None:
        report["global_structure"] = global_structure_report(
            test.cls.numpy(), y_test.numpy(), structure, config.train.seed
        )
    write_bytes_atomic(out.join(REPORT_FILE), json.dumps(report, indent=1).encode())
    return EvalOutcome(out.uri, out.join(REPORT_FILE).uri, pca_uri, report)


@dataclass(frozen=True)
class StructureRequest:
    """``ray-ssl eval --global-structure``: the test split's class names and, when the labels
    have one, the class tree to compare against (:mod:`ray_ssl.eval.global_structure`)."""

    class_names: list[str]
    class_tree: str | None


def global_structure_report(
    features: np.ndarray, labels: np.ndarray, request: StructureRequest, seed: int
) -> dict[str, Any]:
    """The label-free metric of the test features and, with a class tree, the tree metrics."""
    from ray_ssl.eval.class_tree import load_class_tree
    from ray_ssl.eval.global_structure import (
        DEFAULT_CENTROIDS,
        class_tree_structure,
        label_free_structure,
    )

    centroids = min(DEFAULT_CENTROIDS, len(features) // STRUCTURE_POINTS_PER_CENTROID)
    if centroids < 2:
        raise EvalError(
            f"{len(features)} labelled test samples are too few for the global-structure metric; "
            f"pass at least {2 * STRUCTURE_POINTS_PER_CENTROID} (eval.knn_max_test)"
        )
    out: dict[str, Any] = {
        "centroids": centroids,
        "label_free": label_free_structure(features, centroids, seed=seed).as_dict(),
    }
    if request.class_tree is not None:
        tree = load_class_tree(request.class_tree)
        out["class_tree"] = request.class_tree
        out["tree"] = class_tree_structure(features, labels, request.class_names, tree).as_dict()
    return out


def pca_grid(patches: Any, images: np.ndarray) -> bytes:
    """The PNG grid of PCA pictures of patch tokens [N, Np, D] beside their images."""
    from ray_ssl.eval.pca import pca_rgb, picture_grid

    grid = math.isqrt(patches.shape[1])
    if grid * grid != patches.shape[1]:
        raise EvalError(f"{patches.shape[1]} patch tokens per image do not form a square grid")
    maps = [pca_rgb(p.numpy(), grid) for p in patches]
    return picture_grid(images, maps)
