"""The pretraining job every ``jobs/*.py`` script runs: check first, then import and train.

The config is resolved and checked (keys, values, the method's view settings) and built-in shard
sets are written before torch, DeepSpeed or Ray is imported, so that bad input fails in seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from ray_ssl.config import Config, load_config, training_views
from ray_ssl.paths import resolve_config_paths

log = logging.getLogger(__name__)

BUILTIN_SOURCES = ("fashion-mnist", "digits", "synthetic")


def ensure_builtin_shards(config: Config) -> None:
    """Write the train (and held-out test) shard sets from a built-in source if missing; the
    semantic pairs of ``shards`` are the train set's (evaluation needs none)."""
    from ray_ssl.data.shards import ensure_shard_set

    if config.shards.source not in BUILTIN_SOURCES:
        return
    splits = [("train", config.data.uri)]
    if config.data.eval_uri is not None:
        splits.append(("test", config.data.eval_uri))
    for split, uri in splits:
        cfg = dataclasses.replace(config.shards, split=split)
        if split != "train":
            cfg = dataclasses.replace(cfg, pairs="none", pairs_file=None)
        manifest = ensure_shard_set(cfg, uri, config.storage)
        log.info("%s shards: %d samples of %s at %s", split, manifest.count, manifest.source, uri)


def pretrain(preset: str, overrides: Sequence[str]) -> Any:
    """Train ``preset`` with ``overrides``; returns the run's
    :class:`~ray_ssl.train.trainer.TrainingOutcome`."""
    config = resolve_config_paths(load_config(preset, list(overrides)))  # before any shards
    training_views(config)  # a view setting the method cannot honour: one line, now
    if not config.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ensure_builtin_shards(config)
    from ray_ssl.train.trainer import run_training

    return run_training(config)
