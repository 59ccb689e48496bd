"""Franca training-step cost: our Ray Train + DeepSpeed step against a plain PyTorch loop.

(a) Overhead: the same FrancaMethod, the same batches and AdamW parameter groups, the same thread
    count; ours runs ``TrainEngine.train_step`` (per-step lr/wd into the param groups, DeepSpeed
    ZeRO-2 forward/backward/clip/step, EMA ``after_step``) inside a Ray Train worker, the baseline
    the equivalent ``torch.optim.AdamW`` loop (``clip_grad_norm_``, EMA) in one process. Both time
    steady-state steps only (start-up and warm-up excluded); the figure is the ratio of median
    step times. Batches are pre-built in memory so that the data pipeline (measured by
    ``benchmarks/data_throughput.py``) is not part of it.
(b) ``--device cuda``: model FLOPs utilisation of the Franca step for ViT-L/14 and ViT-g/14 on
    one GPU (bf16 autocast, activation checkpointing for ViT-g, the largest per-GPU batch that
    fits): backbone matmul FLOPs of the student forward+backward (3x forward) over all crops plus
    the teacher forward over the global crops (the heads are not counted), against a measured
    bf16 matmul peak.
(c) ZeRO-3 model-state memory of Franca ViT-G/14 on 8 nodes x 8 A100-80GB, from the parameter
    counts of the meta-device model (DeepSpeed's estimator), plus the frozen EMA teacher.

Last line: ``overhead_ratio=<ours / baseline median step time>`` (target <= 1.05).
Usage: ``python benchmarks/train_step.py [--quick] [--threads 2] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import torch  # noqa: E402

from ray_ssl.config import Config, load_config  # noqa: E402

# (warm-up steps, alternating rounds, steps per round) for --quick and full runs
STEPS = {True: (3, 4, 2), False: (5, 10, 3)}
BATCHES = 4  # distinct pre-built batches cycled through
QUICK_OVERRIDES = ["model.depth=2", "data.batch_size=32"]
NODES, GPUS_PER_NODE = 8, 8  # cluster/aws-a100.yaml: p4de.24xlarge
MATMUL_SIDE, MATMUL_REPEATS = 8192, 50
GIB = 2**30


def synthetic_batches(config: Config, count: int, device: str) -> list[dict[str, torch.Tensor]]:
    """Batches in the data contract (crop-major uint8 crops, bool masks), fixed by a seed."""
    v, b = config.views, config.data.batch_size
    patches = (v.global_size // v.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        shape_g = (v.global_crops * b, v.channels, v.global_size, v.global_size)
        shape_l = (v.local_crops * b, v.channels, v.local_size, v.local_size)
        masks = torch.rand(v.global_crops * b, patches, generator=generator) < 0.3
        masks[: v.global_crops * b // 2] = False  # half the samples unmasked (mask_sample_p)
        batch = {
            "global_crops": torch.randint(0, 256, shape_g, dtype=torch.uint8, generator=generator),
            "local_crops": torch.randint(0, 256, shape_l, dtype=torch.uint8, generator=generator),
            "masks": masks,
        }
        batches.append({k: t.to(device) for k, t in batch.items()})
    return batches


def timed_steps(
    step_fn: Any, batches: list[Any], first_step: int, count: int
) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of ``count`` steps (device synchronised)."""
    durations = []
    for step in range(first_step, first_step + count):
        wall, cpu = time.perf_counter(), time.process_time()
        step_fn(batches[step % len(batches)], step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        durations.append((time.perf_counter() - wall, time.process_time() - cpu))
    return durations


class PlainLoop:
    """The baseline: FrancaMethod + torch AdamW with the same groups, clipping and schedules."""

    def __init__(self, config: Config, total_steps: int, device: str):
        from ray_ssl.methods.franca import FrancaMethod
        from ray_ssl.train.engine import build_optimizer
        from ray_ssl.train.schedules import TrainSchedules

        torch.manual_seed(0)
        self.config = config
        self.method = FrancaMethod(config, total_steps, total_steps).to(device)
        self.schedules = TrainSchedules.from_config(config, total_steps)
        groups = self.method.param_groups(config.optim)
        self.optimizer = build_optimizer(groups, config.optim, fused=device == "cuda")
        self.trainable = [p for p in self.method.parameters() if p.requires_grad]
        self.batches = synthetic_batches(config, BATCHES, device)
        self.step = 0

    def _train_step(self, batch: dict[str, torch.Tensor], step: int) -> None:
        values = self.schedules.at(step)
        for group in self.optimizer.param_groups:
            lr = 0.0 if step < group["frozen_until"] else values.lr
            group["lr"] = lr * group["lr_mult"]
            group["weight_decay"] = values.weight_decay * group["wd_mult"]
        self.optimizer.zero_grad(set_to_none=True)
        self.method(batch, step)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.optim.clip_grad)
        self.optimizer.step()
        self.method.after_step(step)

    def run(self, count: int) -> list[tuple[float, float]]:
        durations = timed_steps(self._train_step, self.batches, self.step, count)
        self.step += count
        return durations


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: our engine's train_step, ``n`` steps per command until a 0 arrives."""
    import ray.train

    from ray_ssl.config import config_from_dict
    from ray_ssl.methods.registry import build_method
    from ray_ssl.train.engine import build_engine
    from ray_ssl.train.schedules import TrainSchedules

    torch.set_num_threads(loop_config["threads"])
    config = config_from_dict(loop_config["config"])
    total = loop_config["total_steps"]
    commands, results = loop_config["commands"], loop_config["results"]
    torch.manual_seed(0)
    method = build_method(config, total, total)
    engine = build_engine(method, config, TrainSchedules.from_config(config, total))
    batches = synthetic_batches(config, BATCHES, str(engine.device))
    step = 0
    while (count := commands.get()) > 0:
        results.put(timed_steps(engine.train_step, batches, step, count))
        step += count
    ray.train.report({})


def compare_step_times(
    config: Config, threads: int, warmup: int, rounds: int, per_round: int, device: str
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall, CPU) seconds per step of (ours, baseline), in alternating rounds of steps.

    Alternating rounds share the machine's conditions (the other side idles meanwhile); the CPU
    seconds of the process (all its threads) are a second view that other load inflates less.
    """
    import tempfile
    import threading

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from ray_ssl.config import to_dict

    torch.set_num_threads(threads)
    total = warmup + rounds * per_round
    baseline = PlainLoop(config, total, device)
    if not ray.is_initialized():
        ray.init(
            num_cpus=threads + 1,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}},
        )
    commands, results = Queue(), Queue()
    gpu = {"GPU": 1} if config.train.use_gpu else {}
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={
                "config": to_dict(config),
                "threads": threads,
                "total_steps": total,
                "commands": commands,
                "results": results,
            },
            scaling_config=ScalingConfig(
                num_workers=1,
                use_gpu=config.train.use_gpu,
                resources_per_worker={"CPU": threads, **gpu},
            ),
            run_config=RunConfig(name="train-step-bench", storage_path=storage),
        )
        fit = threading.Thread(target=trainer.fit, daemon=True)
        fit.start()
        baseline.run(warmup)
        commands.put(warmup)
        results.get()  # start-up and warm-up of ours: not timed
        ours_times, baseline_times = [], []
        for _ in range(rounds):
            baseline_times += baseline.run(per_round)
            commands.put(per_round)
            ours_times += results.get()
        commands.put(0)
        fit.join()
    return _medians(ours_times), _medians(baseline_times)


def _medians(times: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def matmul_peak_flops(device: str) -> float:
    """Measured bf16 matmul FLOP/s of one device (square matrices, best of a few repeats)."""
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(MATMUL_REPEATS):
        a @ b
    torch.cuda.synchronize()
    return 2 * MATMUL_SIDE**3 * MATMUL_REPEATS / (time.perf_counter() - start)


def franca_step_flops(config: Config) -> int:
    """Backbone FLOPs of one Franca step: student fwd+bwd on all crops, teacher fwd on globals."""
    from ray_ssl.models.vit import vit_forward_flops

    v, b = config.views, config.data.batch_size
    global_fwd = vit_forward_flops(config.model, v.global_size, v.global_crops * b)
    local_fwd = vit_forward_flops(config.model, v.local_size, v.local_crops * b)
    return 3 * (global_fwd + local_fwd) + global_fwd


def mfu_on_one_gpu(arch: str, batches_to_try: tuple[int, ...], warmup: int, timed: int) -> None:
    """Print the MFU of the largest per-GPU batch of ``arch`` that fits (bf16, ZeRO-2, 1 GPU)."""
    from ray_ssl.methods.franca import FrancaMethod
    from ray_ssl.train.engine import build_engine
    from ray_ssl.train.schedules import TrainSchedules

    peak = matmul_peak_flops("cuda")
    for batch in batches_to_try:
        config = load_config(
            "franca_vitg14",
            [
                f"model.arch={arch}",
                f"model.act_checkpointing={arch == 'giant'}",
                f"data.batch_size={batch}",
                "train.num_workers=1",
                "train.zero_stage=2",
            ],
        )
        torch.cuda.reset_peak_memory_stats()
        try:
            torch.manual_seed(0)
            total = warmup + timed
            method = FrancaMethod(config, total, total).cuda()
            engine = build_engine(method, config, TrainSchedules.from_config(config, total))
            batches = synthetic_batches(config, 2, "cuda")
            timed_steps(engine.train_step, batches, 0, warmup)
            seconds, _ = _medians(timed_steps(engine.train_step, batches, warmup, timed))
        except torch.cuda.OutOfMemoryError:
            print(f"{arch} batch {batch}: out of memory")
            method = engine = batches = None
            torch.cuda.empty_cache()
            continue
        flops = franca_step_flops(config)
        print(
            f"{arch}/14 batch {batch}: {seconds:.3f} s/step, {flops / seconds / 1e12:.1f} TFLOP/s "
            f"of {peak / 1e12:.0f} measured bf16 peak, mfu={flops / seconds / peak:.3f}, "
            f"max memory {torch.cuda.max_memory_allocated() / GIB:.1f} GiB"
        )
        method = engine = batches = None
        torch.cuda.empty_cache()
        return
    print(f"{arch}: no batch in {batches_to_try} fits one GPU")


def zero3_memory_estimate() -> None:
    """DeepSpeed's ZeRO-3 model-state estimate for Franca ViT-G/14 on the A100 cluster."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    from ray_ssl.methods.franca import FrancaMethod

    config = load_config("franca_vitg14")
    with torch.device("meta"):
        method = FrancaMethod(config, 1, 1)
    trainable = [p for p in method.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in method.parameters() if not p.requires_grad)
    largest_layer = max(
        sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        for module in method.modules()
    )
    total = sum(p.numel() for p in trainable)
    gpus = NODES * GPUS_PER_NODE
    print(
        f"Franca ViT-G/14: {total / 1e9:.2f} B trainable parameters (student + heads), "
        f"{frozen / 1e9:.2f} B frozen (EMA teacher), largest layer {largest_layer / 1e6:.1f} M"
    )
    estimate_zero3_model_states_mem_needs_all_cold(
        total, largest_layer, num_gpus_per_node=GPUS_PER_NODE, num_nodes=NODES
    )
    # With torch.autocast the parameters stay fp32: 4 (param) + 4 (grad) + 8 (Adam) bytes per
    # trainable parameter and 4 per frozen one, all partitioned over the GPUs.
    per_gpu = (16 * total + 4 * frozen) / gpus
    print(
        f"ours (fp32 params under autocast, ZeRO-3 over {gpus} GPUs): {per_gpu / GIB:.2f} GiB/GPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few steps (< 1 min)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--mfu-only", action="store_true", help="with --device cuda: print the MFU lines only"
    )
    args = parser.parse_args()
    use_gpu = args.device == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    warmup, rounds, per_round = STEPS[args.quick]

    config = load_config("local", QUICK_OVERRIDES if args.quick else [])
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, use_gpu=use_gpu, zero_stage=2)
    )
    if use_gpu:
        for arch, batches in (("large", (64, 48, 32, 16)), ("giant", (48, 32, 24, 16, 8))):
            mfu_on_one_gpu(arch, batches, warmup, rounds * per_round)
        if args.mfu_only:
            return
    zero3_memory_estimate()

    (ours, ours_cpu), (baseline, baseline_cpu) = compare_step_times(
        config, args.threads, warmup, rounds, per_round, args.device
    )
    print(
        f"Franca step, {config.model.arch} ViT depth {config.model.depth}, batch "
        f"{config.data.batch_size}, {args.threads} threads, medians of {rounds * per_round} steps "
        f"in alternating rounds: plain PyTorch {baseline:.3f} s ({baseline_cpu:.3f} CPU-s), "
        f"Ray Train + DeepSpeed ZeRO-2 {ours:.3f} s ({ours_cpu:.3f} CPU-s)"
    )
    print(f"cpu_seconds_ratio={ours_cpu / baseline_cpu:.3f}")
    print(f"overhead_ratio={ours / baseline:.3f}")


if __name__ == "__main__":
    main()
