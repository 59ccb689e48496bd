"""``train_loop_per_worker``: batches -> method -> DeepSpeed engine -> report / checkpoint.

The shape of Ray's ``deepspeed_torch_trainer.py`` example: every worker builds the method and its
engine, restores the latest checkpoint if Ray Train has one, then per step takes a batch, runs
``method(batch, step)``, ``engine.backward``, ``engine.step`` and ``method.after_step``. Every
``log_every`` steps it reports metrics averaged over the workers; every ``checkpoint_every``
steps (and at the end) every rank calls ``method.before_checkpoint``, writes its shard of a
checkpoint and reports it, and Ray Train merges the ranks' directories into one checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import ray.train
import torch

from ray_ssl.config import Config, config_from_dict
from ray_ssl.errors import UserError
from ray_ssl.methods.registry import build_method
from ray_ssl.models.export import EXPORT_DIR
from ray_ssl.storage import read_bytes, write_bytes_atomic
from ray_ssl.train.batches import PassStream
from ray_ssl.train.checkpoint import (
    TrainState,
    export_backbone,
    restore_checkpoint,
    save_checkpoint,
)
from ray_ssl.train.engine import TrainEngine, build_engine
from ray_ssl.train.input_errors import input_error_record
from ray_ssl.train.online_eval import KnnEvaluator
from ray_ssl.train.schedules import TrainSchedules

log = logging.getLogger(__name__)

KNN_METRIC = "knn_top1"


@dataclass(frozen=True)
class LoopPlan:
    """Run geometry computed once on the driver from the config and the shard manifest."""

    steps_per_epoch: int
    total_steps: int
    steps_per_pass: int  # global batches in one pass over the training shards
    num_classes: int
    run_uri: str  # the run's directory in storage (exports go under it)


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class MetricWindow:
    """Scalar outputs of the method accumulated between two reports (no host syncs per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor]) -> None:
        for name, value in out.items():
            value = value.detach().float()
            if value.numel() != 1:
                continue
            self.sums[name] = self.sums.get(name, 0.0) + value.reshape(())
        self.steps += 1

    def reduce(self, extra_sums: dict[str, float], world_size: int) -> dict[str, float]:
        """Means over steps and workers of the method's scalars; sums over workers of extras."""
        names = sorted(self.sums)
        device = self.sums[names[0]].device if names else torch.device("cpu")
        means = torch.stack([self.sums[n] for n in names]) / max(self.steps, 1) if names else None
        totals = torch.tensor([float(v) for v in extra_sums.values()], device=device)
        packed = torch.cat([means, totals]) if means is not None else totals
        if world_size > 1:
            torch.distributed.all_reduce(packed)
        values = packed.tolist()
        result = {n: values[i] / world_size for i, n in enumerate(names)}
        result.update(zip(extra_sums, values[len(names) :], strict=True))
        return result


def configure_logging() -> None:
    """INFO logs of ray_ssl in the worker: through Ray's root handler if it has one."""
    logger = logging.getLogger("ray_ssl")
    logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def _progress(rank: int, total: int, initial: int) -> Any:
    """A tqdm bar on rank 0 that Ray renders on the driver; None elsewhere."""
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="train steps", unit="step")
    if initial:
        bar.update(initial)
    return bar


class WorkerRun:
    """One worker's training state: engine, data stream, evaluator, metric history."""

    def __init__(self, config: Config, plan: LoopPlan):
        self.config, self.plan = config, plan
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        if config.train.torch_threads:  # else Ray's OMP_NUM_THREADS = cpus_per_worker
            torch.set_num_threads(config.train.torch_threads)
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        method = build_method(config, plan.steps_per_epoch, plan.total_steps)
        self.views = method.view_spec
        schedules = TrainSchedules.from_config(config, plan.steps_per_epoch)
        self.engine: TrainEngine = build_engine(method, config, schedules)
        self.state = TrainState(world_size=self.world_size, zero_stage=self.engine.zero_stage)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                self.state = restore_checkpoint(
                    directory, self.engine, self.rank, self.world_size, config.train.seed
                )
        else:
            torch.manual_seed(config.train.seed + 1 + self.rank)  # per-rank masks, drop-path
        self.launch_start = replace(self.state)
        self.evaluator = (
            KnnEvaluator(config, plan.num_classes, self.rank, self.world_size)
            if config.data.eval_uri is not None
            else None
        )
        self.stream = PassStream(
            config,
            self.views,
            plan.steps_per_pass,
            self.engine.device,
            self.rank,
            self.world_size,
            start_step=self.state.step,
            progress=self.state.data,
        )

    def knn(self) -> float:
        assert self.evaluator is not None
        return self.evaluator.accuracy(self.engine.module.backbone(), self.engine.device)

    def _report(self, metrics: dict[str, float], checkpoint: bool) -> None:
        if self.rank == 0:
            self.state.history.append(metrics)
        if not checkpoint:
            ray.train.report(metrics)
            return
        self.engine.module.before_checkpoint(self.state.step)
        self.state.data = self.stream.progress()
        with tempfile.TemporaryDirectory(prefix="ray-ssl-ckpt-") as directory:
            save_checkpoint(directory, self.engine, self.state, self.config, self.rank)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=checkpoint_dir_name(self.state.step),
            )

    def _metrics(self, window: MetricWindow, step: int) -> dict[str, float]:
        elapsed = time.perf_counter() - window.started
        values = self.engine.schedules.at(step - 1)
        extras = {
            "samples_seen": float(self.stream.seen),
            "corrupt_samples": float(self.stream.corrupt),
            "repeated_batches": float(self.stream.repeated_batches),
        }
        metrics = window.reduce(extras, self.world_size)
        # Counters of earlier launches (restored with the checkpoint) plus this launch's.
        metrics["samples_seen"] += self.launch_start.samples_seen
        metrics["corrupt_samples"] += self.launch_start.corrupt_samples
        self.state.samples_seen = int(metrics["samples_seen"])
        self.state.corrupt_samples = int(metrics["corrupt_samples"])
        metrics.update(
            step=float(step),
            epoch=step / self.plan.steps_per_epoch,
            lr=values.lr,
            weight_decay=values.weight_decay,
            images_per_s=window.steps * self.config.data.batch_size / max(elapsed, 1e-9),
        )
        return metrics

    def run(self) -> None:
        t, total = self.config.train, self.plan.total_steps
        if self.state.step == 0 and self.evaluator is not None:
            self._report({"step": 0.0, KNN_METRIC: self.knn()}, checkpoint=False)
        progress = _progress(self.rank, total, self.state.step)
        window = MetricWindow()
        for step in range(self.state.step, total):
            batch = self.stream.next_batch()
            out = self.engine.train_step(batch, step)
            window.add(out)
            done = step + 1
            self.state.step = done
            if progress is not None:
                progress.update(1)
            last = done == total
            is_ckpt = done % t.checkpoint_every == 0 or last
            is_eval = self.evaluator is not None and (
                last or (self.config.eval.knn_every and done % self.config.eval.knn_every == 0)
            )
            if not (is_ckpt or is_eval or done % t.log_every == 0):
                continue
            metrics = self._metrics(window, done)
            if is_eval:
                metrics[KNN_METRIC] = self.knn()
            if self.rank == 0:
                log.info("step %d/%d %s", done, total, _format(metrics))
            if last:
                self.export()
            self._report(metrics, checkpoint=is_ckpt)
            window = MetricWindow()
        if progress is not None:
            progress.close()

    def export(self) -> None:
        export_backbone(
            self.engine.module.backbone(),
            f"{self.plan.run_uri.rstrip('/')}/{EXPORT_DIR}",
            self.config.storage,
            self.rank,
            {"step": self.state.step, "run": self.config.train.run_name},
        )


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config`` = {"config": to_dict(Config), "plan": LoopPlan}."""
    configure_logging()
    config = config_from_dict(loop_config["config"])
    plan = LoopPlan(**loop_config["plan"])
    recorded = input_error_record(plan.run_uri, config.storage)
    if recorded.exists():  # a restart StopOnInputError did not prevent: fail again at once
        raise UserError(read_bytes(recorded).decode())
    try:
        WorkerRun(config, plan).run()
    except UserError as err:
        if not err.transient:  # bad input: a restart would meet it again
            write_bytes_atomic(recorded, str(err).encode())
        raise


def loop_config_for(config_dict: dict[str, Any], plan: LoopPlan) -> dict[str, Any]:
    return {"config": config_dict, "plan": asdict(plan)}
