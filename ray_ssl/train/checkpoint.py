"""Checkpoints of a training run, and the export of the teacher backbone; the only module that
knows DeepSpeed's checkpoint layout.

A checkpoint directory holds DeepSpeed's per-rank shards (``ds/``; every rank writes files with
distinct names, Ray Train merges the ranks' directories), each rank's RNG state (safetensors with
JSON metadata), the method's
extra state, ``train_state.json`` (step, world size, metric history) and ``config.json`` (the
resolved config). Each rank writes ``complete/rank_<r>`` last; a checkpoint missing any of them
is refused at restore. Ray Train registers a checkpoint only after every rank has reported it,
so an interrupted save is never the one ``ray.train.get_checkpoint()`` returns.

Nothing here unpickles arbitrary objects: DeepSpeed's files are read with ``weights_only=True``
(:mod:`ray_ssl.train.safe_load`), the rest is JSON or safetensors.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_ssl.config import Config, StorageConfig, to_dict
from ray_ssl.models.export import EXPORT_META, EXPORT_WEIGHTS
from ray_ssl.storage import resolve, write_bytes_atomic
from ray_ssl.train.safe_load import (
    CheckpointError,
    load_tensors,
    safe_deepspeed_loads,
    weights_only_loads,
)

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "ds"
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the whole module, on rank 0
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
RNG_DIR = "rng"
RNG_SUFFIX = ".safetensors"
COMPLETE_DIR = "complete"


@dataclass
class TrainState:
    """Where the run is: completed optimizer steps and what was reported so far."""

    step: int = 0
    world_size: int = 1
    zero_stage: int = 0
    samples_seen: int = 0  # over all workers and launches, corrupt ones included
    corrupt_samples: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states: torch's as tensors, numpy's and Python's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    numpy_state = np.random.get_state(legacy=False)  # MT19937 key, pos, cached gaussian
    numpy_json = {**numpy_state, "state": {**numpy_state["state"]}}
    numpy_json["state"]["key"] = numpy_state["state"]["key"].tolist()
    version, internal, gauss_next = random.getstate()
    python_json = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    return tensors, {"numpy": json.dumps(numpy_json), "python": json.dumps(python_json)}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    numpy_state = json.loads(meta["numpy"])
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    python_state = json.loads(meta["python"])
    random.setstate(
        (python_state["version"], tuple(python_state["state"]), python_state["gauss_next"])
    )
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_rng_state(path: Path) -> None:
    """Write this process's RNG states as one safetensors file (JSON in its metadata)."""
    from safetensors.torch import save_file

    tensors, meta = _rng_state()
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> None:
    """Restore exactly the RNG states :func:`save_rng_state` wrote (no pickle involved)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} is missing; the checkpoint is incomplete or was written "
            "by an older ray-ssl: start the run afresh or resume from another checkpoint"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
            meta = fh.metadata() or {}
        _set_rng_state(tensors, meta)
    except (SafetensorError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint file {path} is not an RNG state written by ray-ssl ({err})"
        ) from err


def save_checkpoint(
    directory: str,
    engine: Any,
    state: TrainState,
    config: Config,
    rank: int,
) -> None:
    """Write this rank's part of a checkpoint into local ``directory`` (called on every rank)."""
    path = Path(directory)
    engine.engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG, client_state={"step": state.step})
    (path / RNG_DIR).mkdir(exist_ok=True)
    save_rng_state(path / RNG_DIR / f"rank_{rank}{RNG_SUFFIX}")
    if rank == 0:
        engine.module.save_extra_state(str(path), state.step)
        (path / STATE_FILE).write_text(json.dumps(asdict(state)))
        (path / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=1))
    (path / COMPLETE_DIR).mkdir(exist_ok=True)
    (path / COMPLETE_DIR / f"rank_{rank}").write_text(str(state.step))


def read_train_state(directory: str) -> TrainState:
    """The ``train_state.json`` of a checkpoint directory."""
    raw = json.loads((Path(directory) / STATE_FILE).read_text())
    return TrainState(**raw)


def check_complete(directory: str, world_size: int) -> TrainState:
    """The checkpoint's state if every rank finished writing it and the world size matches."""
    path = Path(directory)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {directory} has no {STATE_FILE}; it is incomplete")
    state = read_train_state(directory)
    missing = [
        r for r in range(state.world_size) if not (path / COMPLETE_DIR / f"rank_{r}").is_file()
    ]
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks the shards of ranks {missing}")
    if state.world_size != world_size:
        raise CheckpointError(
            f"checkpoint {directory} was written by {state.world_size} workers, this run has "
            f"{world_size}; resume with train.num_workers={state.world_size}"
        )
    return state


def restore_checkpoint(directory: str, engine: Any, rank: int, world_size: int) -> TrainState:
    """Load model, teacher, optimizer, RNG and method state from ``directory`` on every rank."""
    state = check_complete(directory, world_size)
    with safe_deepspeed_loads(engine.engine):
        load_path, _ = engine.engine.load_checkpoint(
            directory,
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint under {directory}/{DEEPSPEED_TAG}")
    load_rng_state(Path(directory) / RNG_DIR / f"rank_{rank}{RNG_SUFFIX}")
    engine.module.load_extra_state(directory)
    log.info("resumed from %s at step %d", directory, state.step)
    return state


def gathered_state_dict(
    module: nn.Module, state_dict_fn: Any, rank: int
) -> dict[str, torch.Tensor]:
    """Full float32 CPU tensors of ``state_dict_fn()`` on rank 0 ({} elsewhere).

    Under ZeRO-3 the parameters are gathered first, a collective: every rank must call this.
    """
    import deepspeed

    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_tensor") for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=partitioned):
        if rank != 0:
            return {}
        return {k: v.detach().float().cpu().clone() for k, v in state_dict_fn().items()}


def export_backbone(
    backbone: nn.Module, out_uri: str, storage: StorageConfig, rank: int, extra: dict[str, Any]
) -> str | None:
    """Write the backbone as one safetensors file plus a JSON sidecar for timm; returns its URI.

    ``backbone`` must offer ``timm_name_and_kwargs()`` and ``timm_state_dict()`` (see
    :mod:`ray_ssl.models.vit`). All ranks call this (ZeRO-3 gathers); rank 0 writes.
    """
    from safetensors.torch import save

    tensors = gathered_state_dict(backbone, backbone.timm_state_dict, rank)
    if rank != 0:
        return None
    name, kwargs = backbone.timm_name_and_kwargs()
    loc = resolve(out_uri, storage)
    weights = loc.join(EXPORT_WEIGHTS)
    write_bytes_atomic(weights, save({k: v.contiguous() for k, v in tensors.items()}))
    meta = {"timm_name": name, "timm_kwargs": kwargs, "weights": EXPORT_WEIGHTS, **extra}
    write_bytes_atomic(loc.join(EXPORT_META), json.dumps(meta, indent=1).encode())
    log.info("exported the teacher backbone (%s) to %s", name, weights.uri)
    return weights.uri


def load_module_state(uri: str, storage: StorageConfig, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole module's float32 state dict from a checkpoint directory (local or ``s3://``),
    on the caller's CPU: DeepSpeed's ``mp_rank_00_model_states.pt`` under ZeRO 0-2, the ranks'
    partitions merged under ZeRO-3."""
    import tempfile

    loc = resolve(uri, storage)
    with tempfile.TemporaryDirectory(prefix="ray-ssl-ckpt-") as tmp:
        loc.fs.get(loc.path.rstrip("/") + "/", tmp, recursive=True)
        local = Path(tmp) / DEEPSPEED_TAG
        if zero_stage < 3:
            states = load_tensors(
                local / DEEPSPEED_MODEL_STATES,
                name=loc.join(DEEPSPEED_TAG, DEEPSPEED_MODEL_STATES).uri,
            )
            return states["module"]
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        for part in sorted(local.glob("*.pt")):  # names a refused file; mmap reads no tensors
            load_tensors(part, name=loc.join(DEEPSPEED_TAG, part.name).uri, mmap=True)
        with weights_only_loads(loc.join(DEEPSPEED_TAG).uri):  # zero_to_fp32 asks for pickle
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=DEEPSPEED_TAG)
