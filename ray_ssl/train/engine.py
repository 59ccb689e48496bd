"""DeepSpeed engine for a Method: ZeRO config, the method's parameter groups, per-step schedules.

The whole :class:`~ray_ssl.methods.base.Method` (student, heads and the frozen EMA teacher) is the
engine's module, so under ZeRO-3 the teacher's parameters are partitioned exactly like the
student's and the method's EMA updates local partitions. Only parameters with
``requires_grad`` reach the optimizer, in the groups the method defines
(:meth:`~ray_ssl.methods.base.Method.param_groups`). The learning rate and weight decay of every
step are written into the optimizer's ``param_groups`` (each group carries its multipliers and
the step its freeze ends), which is how DINOv2 applies its schedules; DeepSpeed keeps those extra
keys on its ZeRO optimizers' groups.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ray_ssl.config import Config, OptimConfig
from ray_ssl.methods.base import Method
from ray_ssl.train.schedules import StepValues, TrainSchedules

log = logging.getLogger(__name__)

NEVER_PRINT = 2**31 - 1  # DeepSpeed steps_per_print: we report metrics ourselves


def build_optimizer(
    groups: list[dict[str, Any]], optim: OptimConfig, fused: bool
) -> torch.optim.Optimizer:
    """AdamW (DINOv2), SGD with momentum (InstDisc) or LARS (SimCLR, VICReg; timm's, whose
    trust ratio skips groups without weight decay, as VICReg's exclude_bias_and_norm); lr and
    weight decay are set per step by the schedules."""
    torch_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if optim.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=0.0, momentum=optim.momentum_sgd, weight_decay=0.0)
    if optim.name == "lars":
        from timm.optim import Lars

        return Lars(torch_groups, lr=0.0, momentum=optim.momentum_sgd, weight_decay=0.0)
    return torch.optim.AdamW(torch_groups, lr=0.0, betas=optim.betas, weight_decay=0.0, fused=fused)


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run: ZeRO stage, precision, clipping, batch sizes."""
    t = config.train
    per_worker = config.data.batch_size // world_size
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=t.use_gpu)
    return {
        "train_batch_size": per_worker * world_size,
        "train_micro_batch_size_per_gpu": per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.optim.clip_grad,
        "zero_optimization": zero,
        # bf16 through torch.autocast: parameters (the EMA teacher's too) stay float32, so
        # EMA steps of 1-m < 2^-8 are not rounded away as they would be in bf16 parameters.
        "torch_autocast": {"enabled": t.precision == "bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": NEVER_PRINT,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefer_installed_ninja() -> None:
    """Put this interpreter's ``bin`` (the pip ``ninja`` DeepSpeed depends on) first on PATH.

    On CPU DeepSpeed JIT-builds its shared-memory all-reduce op into one cache per user. ninja
    1.13 (pip) and an older system ninja record the build commands under different hashes in that
    cache's log, so processes that alternate between the two rebuild the op every time: 60-300 s
    per process start on 2 cores, measured. One ninja for every process builds it once.
    """
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def ensure_distributed(use_gpu: bool) -> None:
    """Reuse the process group Ray Train set up; else start a one-process group (tests, bench)."""
    prefer_installed_ninja()  # before DeepSpeed's backend builds its CPU op
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(var, value)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False)


@dataclass
class TrainEngine:
    """A DeepSpeed engine around a method, with the run's schedules."""

    engine: Any  # deepspeed.DeepSpeedEngine
    schedules: TrainSchedules

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def apply_schedules(self, step: int) -> StepValues:
        """Write this step's lr and weight decay into every optimizer param group."""
        values = self.schedules.at(step)
        for group in self.engine.optimizer.param_groups:
            lr = 0.0 if step < group["frozen_until"] else values.lr
            group["lr"] = lr * group["lr_mult"]
            group["weight_decay"] = values.weight_decay * group["wd_mult"]
        return values

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One optimizer step: schedules, forward, backward, clip + step, then ``after_step``."""
        self.apply_schedules(step)
        out = self.engine(batch, step)
        self.engine.backward(out["loss"])
        self.engine.step()
        self.engine.module.after_step(step)
        self._refresh_persistent_frozen_params()
        return out

    def _refresh_persistent_frozen_params(self) -> None:
        """Re-gather ZeRO-3's persistent (small, never re-gathered) frozen params after the EMA.

        ZeRO-3 keeps parameters below ``stage3_param_persistence_threshold`` whole on every rank
        and refreshes them from the partitions inside ``engine.step()``, i.e. before
        ``after_step`` writes the EMA into the teacher's partitions; without this the teacher's
        norms and biases would lag one step behind.
        """
        if self.zero_stage != 3:
            return
        params = [p for p in self.engine.optimizer.persistent_parameters if not p.requires_grad]
        if params:
            params[0].partition(params)  # drop the stale whole copies (partitions are kept)
            params[0].all_gather(params)


def build_engine(method: Method, config: Config, schedules: TrainSchedules) -> TrainEngine:
    """Wrap ``method`` in a DeepSpeed engine configured from ``config``."""
    import deepspeed

    ensure_distributed(config.train.use_gpu)
    world_size = torch.distributed.get_world_size()
    groups = method.param_groups(config.optim)
    fused = config.train.use_gpu and torch.cuda.is_available()
    optimizer = build_optimizer(groups, config.optim, fused=fused)
    engine, _, _, _ = deepspeed.initialize(
        model=method, optimizer=optimizer, config=deepspeed_config(config, world_size)
    )
    log.info(
        "DeepSpeed ZeRO-%d engine: %d trainable params in %d groups, world size %d",
        config.train.zero_stage,
        sum(p.numel() for g in groups for p in g["params"]),
        len(groups),
        world_size,
    )
    return TrainEngine(engine, schedules)
