"""``run_rasa``: fit RASA on a frozen exported backbone as a one-worker Ray Train job.

The driver checks the inputs (config, export sidecar, shard set) before Ray starts, then runs a
``TorchTrainer`` whose worker streams single views of ``data.uri`` at the export's image size
through the data plane (:class:`~ray_ssl.train.batches.PassStream`, a new augmentation seed every
pass), feeds the backbone's final-norm patch tokens to :func:`~ray_ssl.eval.rasa.fit_rasa`,
evaluates, and reports the basis and the report as a checkpoint. The driver writes both beside
the export: ``<export>.rasa.safetensors`` and ``<export>.rasa.json``.

The report compares, before and after removing Q, on held-out images: the MSE of round 1's
position regressor and of a round T+1 regressor trained the same way on the debiased tokens (the
reference scores each round by its regressor on validation images), and of a closed-form affine
probe, against chance; the cosine of the removed component to the positional embedding; and
weighted kNN on mean patch tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray_ssl.config import Config, ConfigError, RasaConfig, config_from_dict, to_dict
from ray_ssl.data.shards import read_manifest
from ray_ssl.eval.errors import RasaError
from ray_ssl.models.export import WEIGHTS_SUFFIX, export_files, read_export_meta
from ray_ssl.paths import absolute_path, resolve_config_paths
from ray_ssl.storage import resolve, write_bytes_atomic

log = logging.getLogger(__name__)

BASIS_SUFFIX = ".rasa.safetensors"
REPORT_SUFFIX = ".rasa.json"
CHECKPOINT_BASIS, CHECKPOINT_REPORT = "rasa_basis.safetensors", "rasa_report.json"
MIN_HELD_OUT = 2  # images per split when the held-out set is cut from data.uri


@dataclass(frozen=True)
class ExportInfo:
    """An exported backbone: its weights, the timm model that loads them, and its geometry."""

    weights_uri: str
    timm_name: str
    timm_kwargs: dict[str, Any]
    img_size: int
    patch_size: int
    in_chans: int

    @property
    def stem(self) -> str:
        return self.weights_uri[: -len(WEIGHTS_SUFFIX)]

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class RasaOutcome:
    basis_uri: str
    report_uri: str
    report: dict[str, Any]


def read_export(uri: str, config: Config) -> ExportInfo:
    """The export at ``uri`` (its ``.safetensors`` file or export directory), checked by the one
    export reader (:func:`~ray_ssl.models.export.read_export_meta`). No torch needed."""
    meta = read_export_meta(uri, config.storage)
    kwargs = dict(meta.get("timm_kwargs", {}))
    try:
        info = ExportInfo(
            weights_uri=export_files(uri, config.storage).weights.uri,
            timm_name=meta["timm_name"],
            timm_kwargs=kwargs,
            img_size=int(kwargs["img_size"]),
            patch_size=int(kwargs["patch_size"]),
            in_chans=int(kwargs.get("in_chans", 3)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise RasaError(
            f"export {uri} is not a ViT export (its sidecar lacks {err}); RASA needs the patch "
            "tokens of a ViT written by a ray-ssl training run"
        ) from err
    if info.grid < 2 or info.img_size % info.patch_size:
        raise RasaError(
            f"export {uri} has img_size={info.img_size} and patch_size={info.patch_size}; RASA "
            "needs a patch grid of at least 2 x 2"
        )
    return info


def check_rasa_config(cfg: RasaConfig) -> None:
    """One-line ConfigErrors for values the dataclass types cannot rule out."""
    for name in ("rounds", "epochs", "batch_size", "probe_images"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"rasa.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
        raise ConfigError(f"rasa.steps_per_epoch={cfg.steps_per_epoch} must be >= 1 or null")
    if not cfg.lr > 0 or not 0 <= cfg.min_lr <= cfg.lr or cfg.weight_decay < 0:
        raise ConfigError(
            f"rasa.lr={cfg.lr}, rasa.min_lr={cfg.min_lr}, rasa.weight_decay={cfg.weight_decay}: "
            "need lr > 0, 0 <= min_lr <= lr and weight_decay >= 0"
        )


def rasa_job_config(config: Config, export: ExportInfo, channels: int) -> Config:
    """``config`` with single views at the export's geometry and the RASA batch as data batch."""
    if channels != export.in_chans:
        raise ConfigError(
            f"the images of {config.data.uri} have {channels} channels but the export takes "
            f"{export.in_chans}; use shards with {export.in_chans} channels"
        )
    size = export.img_size
    views = dataclasses.replace(
        config.views,
        kind="single",
        global_size=size,
        local_crops=0,
        local_size=size,
        patch_size=export.patch_size,
        channels=channels,
        mask="none",
    )
    model = dataclasses.replace(
        config.model, patch_size=export.patch_size, img_size=size, in_chans=export.in_chans
    )
    data = dataclasses.replace(config.data, batch_size=config.rasa.batch_size)
    return config_from_dict(
        to_dict(dataclasses.replace(config, views=views, model=model, data=data))
    )


def run_rasa(export_uri: str, config: Config) -> RasaOutcome:
    """Fit RASA for the export at ``export_uri`` on ``config.data.uri``; write Q and the report
    beside the export."""
    check_rasa_config(config.rasa)
    export = read_export(absolute_path(export_uri), config)
    manifest = read_manifest(config.data.uri, config.storage)
    if config.data.eval_uri is not None:
        read_manifest(config.data.eval_uri, config.storage)
    elif manifest.count < 2 * MIN_HELD_OUT:
        raise RasaError(
            f"{config.data.uri} has {manifest.count} images, too few to hold some out; pass "
            "labelled held-out shards with --eval-data"
        )
    config = rasa_job_config(config, export, manifest.channels)
    steps_per_pass = manifest.count // config.rasa.batch_size
    if steps_per_pass < 1:
        raise ConfigError(
            f"rasa.batch_size={config.rasa.batch_size} is larger than the {manifest.count} "
            f"samples of {config.data.uri}; lower it"
        )
    config = resolve_config_paths(config)
    steps_per_epoch = config.rasa.steps_per_epoch or steps_per_pass
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    log.info(
        "RASA on %s: %d rounds of %d steps of %d images, grid %dx%d",
        export.weights_uri,
        config.rasa.rounds,
        config.rasa.epochs * steps_per_epoch,
        config.rasa.batch_size,
        export.grid,
        export.grid,
    )
    loop_config = {
        "config": to_dict(config),
        "export": asdict(export),
        "steps_per_pass": steps_per_pass,
        "steps_per_epoch": steps_per_epoch,
        "num_classes": len(manifest.classes),
    }
    result = _trainer(config, loop_config).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the RASA job ended without a result ({result.error})")
    with result.checkpoint.as_directory() as directory:
        basis_bytes = (Path(directory) / CHECKPOINT_BASIS).read_bytes()
        report = json.loads((Path(directory) / CHECKPOINT_REPORT).read_text())
    basis_uri, report_uri = export.stem + BASIS_SUFFIX, export.stem + REPORT_SUFFIX
    report.update(export=export.weights_uri, basis=basis_uri, job=result.path)
    write_bytes_atomic(resolve(basis_uri, config.storage), basis_bytes)
    write_bytes_atomic(resolve(report_uri, config.storage), json.dumps(report, indent=1).encode())
    log.info("wrote the RASA basis to %s and its report to %s", basis_uri, report_uri)
    return RasaOutcome(basis_uri, report_uri, report)


def _trainer(config: Config, loop_config: dict[str, Any]) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_ssl.train.trainer import storage_for_ray

    t = config.train
    storage_path, filesystem = storage_for_ray(config)
    resources = {"CPU": float(t.cpus_per_worker), **({"GPU": 1.0} if t.use_gpu else {})}
    return TorchTrainer(
        rasa_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{t.run_name}-rasa-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=0),
        ),
    )


def rasa_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: fit, evaluate, report the basis and the report as a checkpoint."""
    import ray.train
    import torch

    from ray_ssl.eval.rasa import (
        fit_rasa,
        save_rasa_basis,
        shuffled_batches,
        train_next_round_probe,
    )
    from ray_ssl.train.batches import PassStream
    from ray_ssl.train.loop import configure_logging
    from ray_ssl.train.rasa_eval import RasaEvaluator, frozen_backbone, patch_tokens

    configure_logging()
    config = config_from_dict(loop_config["config"])
    export = ExportInfo(**loop_config["export"])
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    torch.manual_seed(config.rasa.seed)
    device = torch.device("cuda" if config.train.use_gpu else "cpu")
    backbone = frozen_backbone(export, config.storage, device)
    stream = PassStream(config, config.views, loop_config["steps_per_pass"], device, 0, 1)

    def next_tokens() -> torch.Tensor:
        return patch_tokens(backbone, stream.next_batch()["global_crops"])

    cfg, steps_per_epoch = config.rasa, loop_config["steps_per_epoch"]
    steps_per_round = cfg.epochs * steps_per_epoch
    started = time.perf_counter()
    source = next_tokens
    if cfg.cache_tokens:
        cached = torch.cat([next_tokens() for _ in range(steps_per_epoch)])
        source = shuffled_batches(cached, cfg.batch_size, cfg.seed).__next__
    fit = fit_rasa(source, backbone.num_features, steps_per_round, cfg)
    fit_seconds = time.perf_counter() - started
    probe = train_next_round_probe(source, fit.basis, steps_per_round, cfg)
    evaluator = RasaEvaluator(config, export, loop_config["num_classes"], device)
    report = evaluator.report(backbone, fit.basis, fit.first_regressor, probe)
    report.update(
        round_losses=fit.round_losses,
        steps_per_round=steps_per_round,
        fit_seconds=fit_seconds,
        samples_seen=stream.seen,
        corrupt_samples=stream.corrupt,
        config={"rasa": asdict(config.rasa), "views": asdict(config.views)},
    )
    meta = {"rounds": config.rasa.rounds, "grid": export.grid, "export": export.weights_uri}
    with tempfile.TemporaryDirectory(prefix="ray-ssl-rasa-") as directory:
        save_rasa_basis(str(Path(directory, CHECKPOINT_BASIS)), fit.basis, meta)
        Path(directory, CHECKPOINT_REPORT).write_text(json.dumps(report, indent=1))
        ray.train.report(
            {"position_mse_after_vs_chance": report["position_mse"]["after_vs_chance"]},
            checkpoint=ray.train.Checkpoint.from_directory(directory),
        )
