"""DeepSpeed engine: parameter groups, and 2 workers under ZeRO-2/ZeRO-3 against 1 worker.

A deterministic toy method (no dropout, fixed data) trains with the real engine: the only
difference between the runs is how the global batch is distributed, so the loss trajectories
must agree to float32 rounding (rtol 1e-5). Under ZeRO-3 the EMA teacher, updated in place on
each rank's partitions, must equal an EMA computed independently from the gathered student.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ray import cloudpickle
from torch import nn

from ray_ssl.config import Config, ViewConfig, load_config
from ray_ssl.methods.base import Method, decay_param_groups
from ray_ssl.models.ema import copy_params_, ema_update_

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests

IN_DIM, HIDDEN, OUT_DIM = 12, 16, 8
GLOBAL_BATCH, STEPS, STEPS_PER_EPOCH = 8, 8, 3
FROZEN_STEPS = STEPS_PER_EPOCH  # the toy's freeze rule: its last layer trains from epoch 1
LOSS_RTOL = 1e-5  # float32 with a different reduction order across 1 and 2 workers
EMA_ATOL = 1e-6
BF16_RTOL = 3e-2  # bf16 matmuls (8-bit mantissa) against float32
RESULTS_FILE = "results.json"


def momentum_at(step: int) -> float:
    return 0.9 - 0.02 * step


class ToyMethod(Method):
    """Student/teacher MLPs named like a ViT + DINO head, so every parameter group occurs."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.student = self._network()
        self.teacher = self._network()
        copy_params_(self.teacher, self.student)
        self.teacher.requires_grad_(False)

    @staticmethod
    def _network() -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "patch_embed": nn.Linear(IN_DIM, HIDDEN),
                "norm": nn.LayerNorm(HIDDEN),
                "mlp": nn.Linear(HIDDEN, HIDDEN),
                "last_layer": nn.Linear(HIDDEN, OUT_DIM, bias=False),
            }
        )

    @staticmethod
    def _run(net: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        h = net["norm"](net["patch_embed"](x))
        return net["last_layer"](torch.tanh(net["mlp"](h)))

    @property
    def view_spec(self) -> ViewConfig:
        return ViewConfig(kind="single")

    def backbone(self) -> nn.Module:
        return self.teacher

    def frozen_until(self, name: str) -> int:
        return FROZEN_STEPS if ".last_layer." in name else 0

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self._run(self.teacher, batch["x"])
        loss = ((self._run(self.student, batch["x"]) - 0.5 * target - batch["y"]) ** 2).mean()
        return {"loss": loss}

    def after_step(self, step: int) -> None:
        ema_update_(self.teacher, self.student, momentum_at(step))


def global_batch(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return {
        "x": torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator),
        "y": torch.randn(GLOBAL_BATCH, OUT_DIM, generator=generator),
    }


def toy_config(zero_stage: int, workers: int) -> Config:
    return load_config(
        "local",
        [
            f"train.zero_stage={zero_stage}",
            f"train.num_workers={workers}",
            f"data.batch_size={GLOBAL_BATCH}",
            "train.epochs=3",
            "optim.warmup_epochs=1",
            "optim.base_lr=0.05",
            "optim.clip_grad=0.5",  # small enough to clip: the clipping path is exercised
        ],
    )


def _gather(module: nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().clone().double() for name, p in params.items()}


def train_toy(
    zero_stage: int, rank: int, world_size: int, precision: str = "fp32"
) -> dict[str, Any]:
    """Train the toy method on this rank's share of each global batch; gather-check the EMA."""
    from ray_ssl.train.engine import build_engine
    from ray_ssl.train.schedules import TrainSchedules

    config = toy_config(zero_stage, world_size)
    config.train.precision = precision
    torch.manual_seed(0)
    schedules = TrainSchedules.from_config(config, STEPS_PER_EPOCH)
    engine = build_engine(ToyMethod(config), config, schedules)
    method = engine.module
    reference_teacher = _gather(method.student) if zero_stage == 3 else None
    per_worker = GLOBAL_BATCH // world_size
    losses, lr_ok = [], True
    for step in range(STEPS):
        batch = {
            k: v[rank * per_worker : (rank + 1) * per_worker] for k, v in global_batch(step).items()
        }
        out = engine.train_step(batch, step)
        loss = out["loss"].detach().clone()
        torch.distributed.all_reduce(loss)
        losses.append(float(loss) / world_size)
        values = schedules.at(step)
        for group in engine.engine.optimizer.param_groups:
            lr = (0.0 if step < group["frozen_until"] else values.lr) * group["lr_mult"]
            wd = values.weight_decay * group["wd_mult"]
            lr_ok &= math.isclose(group["lr"], lr) and math.isclose(group["weight_decay"], wd)
        if reference_teacher is not None:
            student, m = _gather(method.student), momentum_at(step)
            for name, value in student.items():
                reference_teacher[name] = m * reference_teacher[name] + (1 - m) * value
    teacher_dtypes = sorted(
        {str(getattr(p, "ds_tensor", p).dtype) for p in method.teacher.parameters()}
    )
    result: dict[str, Any] = {"losses": losses, "lr_ok": lr_ok, "teacher_dtypes": teacher_dtypes}
    if reference_teacher is not None:
        teacher = _gather(method.teacher)
        result["ema_max_err"] = max(
            float((teacher[n] - reference_teacher[n]).abs().max()) for n in teacher
        )
        result["partitioned"] = all(hasattr(p, "ds_tensor") for p in method.teacher.parameters())
    return result


def _two_worker_loop(_: dict[str, Any]) -> None:
    import json
    import tempfile

    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    results = {f"zero{stage}": train_toy(stage, rank, world) for stage in (2, 3)}
    with tempfile.TemporaryDirectory() as directory:  # Ray V2 keeps metrics of checkpoints only
        Path(directory, RESULTS_FILE).write_text(json.dumps(results))
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report({}, checkpoint=checkpoint)


def _one_worker(queue: Any) -> None:
    fp32 = train_toy(0, 0, 1)
    bf16 = train_toy(2, 0, 1, precision="bf16")
    queue.put({**fp32, "bf16": bf16})


def test_param_groups_follow_dinov2_rules() -> None:
    config = toy_config(2, 1)
    groups = ToyMethod(config).param_groups(config.optim)
    by_name = {n: g for g in groups for n in g["names"]}
    assert not any(n.startswith("teacher.") for n in by_name)  # the frozen EMA teacher
    assert len(by_name) == 7
    assert by_name["student.patch_embed.weight"]["lr_mult"] == config.optim.patch_embed_lr_mult
    assert by_name["student.patch_embed.weight"]["wd_mult"] == 1.0
    assert by_name["student.patch_embed.bias"]["wd_mult"] == 0.0
    assert by_name["student.norm.weight"]["wd_mult"] == 0.0
    assert (by_name["student.mlp.weight"]["lr_mult"], by_name["student.mlp.weight"]["wd_mult"]) == (
        1.0,
        1.0,
    )
    assert by_name["student.last_layer.weight"]["frozen_until"] == FROZEN_STEPS
    assert by_name["student.mlp.weight"]["frozen_until"] == 0


def test_vit_tokens_have_no_weight_decay() -> None:
    from ray_ssl.models.vit import build_vit

    config = load_config("local", ["model.depth=1"])
    groups = decay_param_groups(build_vit(config.model), config.optim, lambda name: 0)
    decay = {n: g["wd_mult"] for g in groups for n in g["names"]}
    for name in ("cls_token", "pos_embed", "mask_token", "blocks.0.ls1.gamma", "norm.weight"):
        assert decay[name] == 0.0, name
    assert decay["blocks.0.attn.qkv.weight"] == 1.0


def test_two_workers_zero2_zero3_match_one_worker(ray_local: None, tmp_path: Any) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    reference = context.Process(target=_one_worker, args=(queue,))
    reference.start()
    result = TorchTrainer(
        _two_worker_loop,
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="engine", storage_path=str(tmp_path)),
    ).fit()
    single = queue.get(timeout=600)
    reference.join()
    distributed = json.loads(Path(result.checkpoint.path, RESULTS_FILE).read_text())

    assert single["lr_ok"]
    # bf16 runs under torch.autocast: same trajectory to bf16 precision, teacher kept float32.
    assert single["bf16"]["teacher_dtypes"] == ["torch.float32"]
    assert single["bf16"]["losses"] == pytest.approx(single["losses"], rel=BF16_RTOL)
    expected = single["losses"]
    assert expected[-1] < expected[0]  # it trains
    for stage in ("zero2", "zero3"):
        run = distributed[stage]
        assert run["lr_ok"], stage
        assert run["losses"] == pytest.approx(expected, rel=LOSS_RTOL), stage
    assert distributed["zero3"]["partitioned"]
    assert distributed["zero3"]["ema_max_err"] < EMA_ATOL


def test_the_installed_ninja_comes_first_so_deepspeeds_op_builds_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A system ninja of another version first on PATH rebuilds DeepSpeed's CPU op every run."""
    from ray_ssl.train.engine import prefer_installed_ninja

    bin_dir = str(Path(sys.executable).parent)
    if not (Path(bin_dir) / "ninja").is_file():
        pytest.skip("no pip ninja beside this interpreter")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    prefer_installed_ninja()
    prefer_installed_ninja()  # idempotent: not added twice
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
