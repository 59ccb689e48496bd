"""Pretrain InstDisc (Wu et al., arXiv 1805.01978) with its memory bank held by Ray actors.

    ray job submit --working-dir . -- python jobs/instdisc.py --preset imagenet   # ResNet-50
    python jobs/instdisc.py --preset local                                       # CPU, minutes
    python jobs/instdisc.py --preset local train.epochs=3 instdisc.bank_shards=4

``--preset local`` is ``instdisc_local`` (Fashion-MNIST, timm ResNet-10t, written to local shards
if missing) and ``--preset imagenet`` is ``instdisc_imagenet``; any preset name or YAML path works.
The driver creates the sharded bank (so it outlives the Train workers), trains through
``run_training`` (workers attach to the bank by name; it is snapshotted with every checkpoint),
then reports weighted kNN (k=200, sigma=0.07, sec. 3.4) on the held-out split two ways: with the
bank itself as the training features (the paper's protocol) and with recomputed features.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from ray_ssl.cli import job_main  # noqa: E402
from ray_ssl.config import Config, ConfigError, load_config  # noqa: E402

log = logging.getLogger("ray_ssl.jobs.instdisc")

PRESET_ALIASES = {"local": "instdisc_local", "imagenet": "instdisc_imagenet"}
BUILTIN_SOURCES = ("fashion-mnist", "digits", "synthetic")
DEEPSPEED_MODEL_STATES = "ds/mp_rank_00_model_states.pt"  # ZeRO 0-2: the whole module


def prepare_config(preset: str, overrides: Sequence[str]) -> Config:
    """Resolve the preset, write built-in shards if missing, and pin N to the shard set."""
    from ray_ssl.data.shards import ensure_shard_set, read_manifest
    from ray_ssl.storage import resolve

    config = load_config(PRESET_ALIASES.get(preset, preset), list(overrides))
    if config.shards.source in BUILTIN_SOURCES:
        splits = [("train", config.data.uri)]
        if config.data.eval_uri is not None:
            splits.append(("test", config.data.eval_uri))
        for split, uri in splits:
            ensure_shard_set(dataclasses.replace(config.shards, split=split), uri, config.storage)
    count = read_manifest(config.data.uri, config.storage).count
    n = config.instdisc.num_instances
    if n is not None and n != count:
        raise ConfigError(
            f"instdisc.num_instances={n} but {config.data.uri} holds {count} samples; the bank "
            f"needs one row per sample: set instdisc.num_instances={count}"
        )
    config.instdisc.num_instances = count
    if not config.train.storage_path.startswith("s3://"):  # workers may run in another cwd
        config.train.storage_path = resolve(config.train.storage_path).path
    return config


def load_trained_method(config: Config, checkpoint_uri: str):
    """The InstDisc network with the weights of a finished run's checkpoint (on the driver)."""
    import torch

    from ray_ssl.methods.instdisc import InstDiscMethod
    from ray_ssl.storage import resolve

    method = InstDiscMethod(config, steps_per_epoch=1, total_steps=1)  # inference only
    loc = resolve(checkpoint_uri, config.storage)
    with tempfile.TemporaryDirectory(prefix="instdisc-ckpt-") as tmp:
        loc.fs.get(loc.path.rstrip("/") + "/", tmp, recursive=True)
        if config.train.zero_stage < 3:
            states = torch.load(Path(tmp) / DEEPSPEED_MODEL_STATES, weights_only=False)
            state_dict = states["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state_dict = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="ds")
    method.load_state_dict(state_dict, strict=False)  # _extra_state (Z) is not needed here
    return method.eval()


def evaluate(config: Config, method, bank) -> dict[str, float]:
    """Weighted kNN top-1 on the held-out split (``eval.knn_max_test`` images), with the whole
    bank as the labelled memory (paper protocol) and with recomputed features of the first
    ``eval.knn_max_train`` training images (a full feature pass costs an epoch of forwards)."""
    import numpy as np
    import torch

    from ray_ssl.data.stream import load_labelled_arrays
    from ray_ssl.eval.features import extract_features
    from ray_ssl.eval.knn import weighted_knn_accuracy
    from ray_ssl.methods.instdisc import embedding_network, knn_predict_from_bank
    from ray_ssl.models.vit import normalize_images

    inst, e, size = config.instdisc, config.eval, config.views.global_size
    train_images, train_labels, train_idx = load_labelled_arrays(
        config.data.uri, config.storage, size=size
    )
    test_images, test_labels, _ = load_labelled_arrays(
        config.data.eval_uri, config.storage, limit=e.knn_max_test, size=size
    )
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    row_labels = np.full(inst.num_instances, -1, dtype=np.int64)
    row_labels[train_idx] = train_labels
    network, device = embedding_network(method), torch.device("cpu")
    test = extract_features(network, test_images, e.feature_batch_size, device, normalize_images)
    test_labels_t = torch.from_numpy(test_labels)
    predicted = knn_predict_from_bank(
        bank, row_labels, test, num_classes, inst.knn_k, inst.knn_sigma
    )
    bank_top1 = float((predicted == test_labels_t).float().mean())
    subset = slice(0, e.knn_max_train)
    train = extract_features(
        network, train_images[subset], e.feature_batch_size, device, normalize_images
    )
    recomputed_top1 = weighted_knn_accuracy(
        train,
        torch.from_numpy(train_labels[subset]),
        test,
        test_labels_t,
        num_classes,
        inst.knn_k,
        inst.knn_sigma,
    )
    return {"knn_bank_top1": bank_top1, "knn_recomputed_top1": recomputed_top1}


def train(preset: str, overrides: Sequence[str]) -> None:
    import ray

    from ray_ssl.memory_bank.bank import ShardedMemoryBank
    from ray_ssl.methods.instdisc import bank_spec
    from ray_ssl.train.trainer import plan_run, run_training

    config = prepare_config(preset, overrides)
    if not config.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    plan_run(config)  # every input error surfaces here, before any actor starts
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A local instance needs logical CPUs for every Train worker, one Ray Data task and the
        # bank shards (mostly idle servers), even when the machine has fewer cores.
        t, inst = config.train, config.instdisc
        needed = t.num_workers * t.cpus_per_worker + 1
        bank = math.ceil(inst.bank_shards * inst.bank_cpus_per_shard)
        cpus = max(os.cpu_count() or 1, needed) + bank
        ray.init(address=address, num_cpus=None if address else cpus)
    bank = ShardedMemoryBank(bank_spec(config))  # owned by the driver: it outlives the workers
    try:
        outcome = run_training(config)
        print(f"run directory: {outcome.run_uri}")
        if outcome.checkpoint_path is None or config.data.eval_uri is None:
            print("no final checkpoint or no held-out split: kNN skipped")
            return
        checkpoint_uri = outcome.checkpoint_path
        if config.train.storage_path.startswith("s3://"):
            checkpoint_uri = f"s3://{checkpoint_uri}"
        method = load_trained_method(config, checkpoint_uri)
        results = evaluate(config, method, bank)
        online = outcome.metrics.get("knn_top1")
        if online is not None:
            print(f"online kNN (backbone features, k={config.eval.knn_k}): {online:.4f}")
        print(
            f"kNN with recomputed features of {config.eval.knn_max_train} train images "
            f"(k={config.instdisc.knn_k}): {results['knn_recomputed_top1']:.4f}"
        )
        print(f"knn_bank_top1={results['knn_bank_top1']:.4f}")
    finally:
        bank.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    job_main(
        __doc__,
        "imagenet",
        train,
        argv,
        preset_help="local | imagenet | a preset name or YAML path",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
