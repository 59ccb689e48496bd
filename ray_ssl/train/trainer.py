"""``run_training``: check the inputs, then pretrain with a Ray Train ``TorchTrainer``.

Every input problem is found here, on the driver, before a worker starts: config values the
dataclasses cannot express, missing or too-small shard sets, images smaller than the crops, and a
run directory that already holds a run of another model or method. Launching the same
``train.run_name`` under the same ``train.storage_path`` again resumes from its latest checkpoint
(Ray Train restores the run's checkpoint list; each worker loads it in ``train_loop_per_worker``)
with any worker count and ZeRO stage: checkpoints are consolidated (``ray_ssl.train.checkpoint``)
and the data position is global (``ray_ssl.data.position``). With ``train.min_workers`` the run
is elastic: Ray Train's ``ScalingConfig(num_workers=(min, max))`` starts it on as many workers
as fit and, after a failure or when resources appear, restarts it at another size from the
latest checkpoint.
Around training the method's driver (:class:`~ray_ssl.methods.base.MethodDriver`) completes the
config, starts and stops what must outlive the workers, and runs the method's final evaluation;
the driver also writes the report (kNN of the backbone against raw pixels) and curves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray_ssl.config import Config, ConfigError, method_plugin, to_dict, training_views
from ray_ssl.data.shards import Manifest, check_pairs, read_manifest
from ray_ssl.errors import UserError
from ray_ssl.methods.base import Method, MethodDriver
from ray_ssl.methods.registry import build_method, method_driver
from ray_ssl.paths import resolve_config_paths
from ray_ssl.storage import pin_endpoint, read_bytes, resolve, s3_options, write_bytes_atomic
from ray_ssl.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainState,
    load_module_state,
)
from ray_ssl.train.input_errors import StopOnInputError, input_error_record
from ray_ssl.train.loop import (
    EXPORT_DIR,
    LoopPlan,
    loop_config_for,
    train_loop_per_worker,
)

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "ray_ssl_config.json"
# Config values that fix the shapes of the saved model and optimizer state: a run directory
# started with other values cannot be resumed by this config. (Regularisation such as drop-path
# and the schedules may change between launches.)
MODEL_SHAPE_KEYS = ("arch", "depth", "patch_size", "img_size", "in_chans", "num_registers")
# The worker count and ZeRO stage may change: checkpoints hold the consolidated state.
LAYOUT_KEYS = ("method",)
# Peak bytes per pixel of the raw-pixel kNN: uint8 images (list and stacked copy), their float32
# copy and its L2-normalised float32 copy.
PIXEL_KNN_BYTES_PER_PIXEL = 10


def state_shaping_keys(config: Config) -> list[tuple[str, str]]:
    """(section, key) pairs that must match between a run directory and a resuming config."""
    method = config.train.method
    return [
        *(("model", k) for k in MODEL_SHAPE_KEYS),
        *((method, k) for k in method_plugin(method).shape_keys),
        *(("train", k) for k in LAYOUT_KEYS),
    ]


@dataclass(frozen=True)
class TrainingOutcome:
    """Where a finished run left its results."""

    run_uri: str
    checkpoint_path: str | None
    metrics: dict[str, Any]
    report_uri: str | None
    export_uri: str
    evaluation: dict[str, float]  # the method's final evaluation (name -> value)

    def summary_lines(self) -> list[str]:
        """What a job prints when the run is done: where things are, then ``name=value`` lines."""
        lines = [f"run directory: {self.run_uri}", f"exported backbone: {self.export_uri}"]
        if self.report_uri:
            lines.append(f"report: {self.report_uri}")
        return lines + [f"{name}={value:.4f}" for name, value in self.evaluation.items()]


def run_uri_of(config: Config) -> str:
    """The run's directory: ``<train.storage_path>/<train.run_name>`` (absolute if local)."""
    base = config.train.storage_path
    if not base.startswith("s3://"):
        base = resolve(base).path
    return f"{base.rstrip('/')}/{config.train.run_name}"


def _check_config(config: Config) -> None:
    training_views(config)  # the method can honour the view settings
    t, v, e = config.train, config.views, config.eval
    if t.precision != "fp32" and not t.use_gpu:
        raise ConfigError(
            f"train.precision={t.precision} needs train.use_gpu=true; "
            "use train.precision=fp32 on CPU"
        )
    for name, value in (
        ("train.epochs", t.epochs),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.log_every", t.log_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.cpus_per_worker", t.cpus_per_worker),
        ("eval.feature_batch_size", e.feature_batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    if t.torch_threads is not None and t.torch_threads < 1:
        raise ConfigError(f"train.torch_threads={t.torch_threads} must be >= 1 or null")
    if t.steps_per_epoch is not None and t.steps_per_epoch < 1:
        raise ConfigError(f"train.steps_per_epoch={t.steps_per_epoch} must be >= 1 or null")
    if e.knn_every < 0:
        raise ConfigError(f"eval.knn_every={e.knn_every} must be >= 0 (0 disables online kNN)")
    if t.max_failures < -1:
        raise ConfigError(f"train.max_failures={t.max_failures} must be >= -1 (-1 = unlimited)")
    if v.kind == "multicrop" and v.local_crops and v.local_size > v.global_size:
        raise ConfigError(
            f"views.local_size={v.local_size} is larger than views.global_size={v.global_size}; "
            "local crops must not exceed global crops"
        )


def _check_images(config: Config, manifest: Manifest) -> None:
    """The crops must fit in the images: compare with the first sample of the shard set."""
    from ray_ssl.data.stream import load_labelled_arrays

    images, _, _ = load_labelled_arrays(config.data.uri, config.storage, 1, labelled_only=False)
    height, width = images.shape[1:3]
    if config.views.global_size > min(height, width):
        raise ConfigError(
            f"views.global_size={config.views.global_size} is larger than the {height}x{width} "
            f"images of {config.data.uri}; choose a crop size <= {min(height, width)}"
        )
    if images.shape[3] != config.views.channels:
        raise ConfigError(
            f"views.channels={config.views.channels} but the images of {config.data.uri} have "
            f"{images.shape[3]} channels ({manifest.source}); set views.channels and "
            "model.in_chans to match"
        )


def plan_run(config: Config) -> tuple[LoopPlan, Manifest]:
    """Validate the inputs and compute the run's geometry (no worker is started)."""
    _check_config(config)
    manifest = read_manifest(config.data.uri, config.storage)
    check_pairs(manifest, config.views.positives, config.data.uri)
    steps_per_pass = manifest.count // config.data.batch_size
    if steps_per_pass < 1:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} is larger than the {manifest.count} samples "
            f"of {config.data.uri}; lower the batch size"
        )
    _check_images(config, manifest)
    num_classes = len(manifest.classes)
    if config.data.eval_uri is not None:
        for uri in (config.data.eval_uri, config.eval.knn_train_uri):
            if uri is not None:
                num_classes = max(num_classes, len(read_manifest(uri, config.storage).classes))
        if num_classes < 2:
            raise ConfigError(
                f"online kNN needs labelled shards but {config.data.uri} / {config.data.eval_uri} "
                "list no classes; set data.eval_uri=null or write labelled shards"
            )
    steps_per_epoch = config.train.steps_per_epoch or steps_per_pass
    plan = LoopPlan(
        steps_per_epoch=steps_per_epoch,
        total_steps=config.train.epochs * steps_per_epoch,
        steps_per_pass=steps_per_pass,
        num_classes=num_classes,
        run_uri=run_uri_of(config),
    )
    return plan, manifest


def _pick(values: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        values = values.get(key, {}) if isinstance(values, dict) else {}
    return values


def check_run_directory(config: Config) -> None:
    """Refuse to resume a run directory that holds a run of another model or method."""
    loc = resolve(run_uri_of(config), config.storage).join(RUN_CONFIG_FILE)
    if not loc.exists():
        return
    saved = json.loads(read_bytes(loc))
    current = to_dict(config)
    for keys in state_shaping_keys(config):
        if _pick(saved, keys) != _pick(current, keys):
            name = ".".join(keys)
            raise CheckpointError(
                f"run '{config.train.run_name}' in {config.train.storage_path} holds checkpoints "
                f"of another model or method ({name}={_pick(saved, keys)!r}, now "
                f"{_pick(current, keys)!r}); choose another train.run_name or delete "
                f"{run_uri_of(config)}"
            )


def _save_run_config(config: Config) -> None:
    loc = resolve(run_uri_of(config), config.storage).join(RUN_CONFIG_FILE)
    write_bytes_atomic(loc, json.dumps(to_dict(config), indent=1).encode())


def storage_for_ray(config: Config) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for ``RunConfig``."""
    path = config.train.storage_path
    if not path.startswith("s3://"):
        return resolve(path).path, None
    import pyarrow.fs

    client = s3_options(config.storage)["client_kwargs"]
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=client.get("endpoint_url"), region=client.get("region_name")
    )
    return path[len("s3://") :].rstrip("/"), filesystem


def build_trainer(config: Config, plan: LoopPlan, callbacks: Sequence[Any] = ()) -> Any:
    """The ``TorchTrainer`` of a run (not started); ``callbacks`` are Ray Train callbacks."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = config.train
    resources = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        resources["GPU"] = 1.0
    storage_path, filesystem = storage_for_ray(config)
    env = {"DS_ACCELERATOR": "cuda" if t.use_gpu else "cpu"}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config_for(to_dict(config), plan),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers if t.min_workers is None else (t.min_workers, t.num_workers),
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            callbacks=[*callbacks, StopOnInputError(plan.run_uri, pin_endpoint(config.storage))],
        ),
    )


def _final_state(checkpoint: Any) -> TrainState:
    """``train_state.json`` of a (possibly remote) checkpoint, without downloading the shards."""
    with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{STATE_FILE}") as fh:
        return TrainState.from_json(json.loads(fh.read()))


def pixel_baseline(config: Config, num_classes: int) -> float:
    """The raw-pixel kNN baseline, computed by a Ray task on a node with the memory it needs
    rather than in the driver: the ViT-G preset's 60k images at 224 px take ~34 GiB as float32,
    more than its head node has."""
    import ray

    from ray_ssl.train.online_eval import pixel_knn_accuracy

    e, v = config.eval, config.views
    pixels = (e.knn_max_train + e.knn_max_test) * v.global_size**2 * v.channels
    task = ray.remote(
        num_cpus=1,
        memory=pixels * PIXEL_KNN_BYTES_PER_PIXEL,
        scheduling_strategy="DEFAULT",  # not in a caller's placement group (a Tune trial's)
    )(pixel_knn_accuracy)
    pinned = dataclasses.replace(config, storage=pin_endpoint(config.storage))
    return float(ray.get(task.remote(pinned, num_classes)))


def write_run_report(config: Config, plan: LoopPlan, history: list[dict[str, float]]) -> str:
    """Write ``report.json`` and ``curves.png`` into the run directory; returns the report URI."""
    from ray_ssl.eval.report import REPORT_FILE, render_report

    baseline = pixel_baseline(config, plan.num_classes)
    run = resolve(plan.run_uri, config.storage)
    for name, content in render_report(to_dict(config), history, baseline).items():
        write_bytes_atomic(run.join(name), content)
    return run.join(REPORT_FILE).uri


def _init_ray(config: Config, driver: MethodDriver) -> None:
    """Connect to ``RAY_ADDRESS`` or start a local Ray with logical CPUs for every Train worker,
    one Ray Data task and the method's own actors (mostly idle, even on fewer cores)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    extra = driver.extra_cpus()
    if address or not extra:
        ray.init(address=address)
        return
    t = config.train
    needed = t.num_workers * t.cpus_per_worker + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, needed) + math.ceil(extra))


def _trained_method(config: Config, checkpoint: Any) -> Method:
    """The method with the weights of a checkpoint, on the driver's CPU (inference only)."""
    method = build_method(config, steps_per_epoch=1, total_steps=1)
    uri = checkpoint.path
    if config.train.storage_path.startswith("s3://"):
        uri = f"s3://{uri}"
    state = load_module_state(uri, config.storage)
    method.load_state_dict(state, strict=False)  # extra state (e.g. a running Z) is not needed
    return method.eval()


def _fit(config: Config, plan: LoopPlan, callbacks: Sequence[Any]) -> Any:
    """``TorchTrainer.fit``; an input error a worker met is raised as that one-line error."""
    from ray.train import TrainingFailedError

    recorded = input_error_record(plan.run_uri, config.storage)
    if recorded.exists():  # from an earlier launch: the user may have fixed the input since
        recorded.fs.rm(recorded.path)
    try:
        return build_trainer(config, plan, callbacks).fit()
    except TrainingFailedError as err:
        if recorded.exists():
            raise UserError(read_bytes(recorded).decode()) from err
        raise


def run_training(config: Config, callbacks: Sequence[Any] = ()) -> TrainingOutcome:
    """Pretrain ``config`` on the connected Ray cluster (starting a local one if none).

    ``callbacks`` go to Ray Train (a Tune sweep passes ``TuneReportCallback``).
    """
    config = resolve_config_paths(config)  # workers and trials run in other directories
    driver = method_driver(config)
    config = driver.prepare(config)
    plan, _ = plan_run(config)
    check_run_directory(config)
    _init_ray(config, driver)
    _save_run_config(config)
    log.info(
        "training %s: %d steps (%d per epoch, %d per data pass) of global batch %d on %d workers",
        config.train.method,
        plan.total_steps,
        plan.steps_per_epoch,
        plan.steps_per_pass,
        config.data.batch_size,
        config.train.num_workers,
    )
    driver.setup()
    try:
        result = _fit(config, plan, callbacks)
        report_uri, evaluation = None, {}
        checkpoint = result.checkpoint
        if checkpoint is not None and config.data.eval_uri is not None:
            report_uri = write_run_report(config, plan, _final_state(checkpoint).history)
            evaluation = driver.evaluate(lambda: _trained_method(config, checkpoint))
    finally:
        driver.teardown()
    return TrainingOutcome(
        run_uri=plan.run_uri,
        checkpoint_path=checkpoint.path if checkpoint is not None else None,
        metrics=dict(result.metrics or {}),
        report_uri=report_uri,
        export_uri=f"{plan.run_uri}/{EXPORT_DIR}",
        evaluation=evaluation,
    )
