"""Checkpoints of a training run, and the export of the teacher backbone; the only module that
knows DeepSpeed's state layout.

**World-size- and ZeRO-stage-free.** A checkpoint holds the *consolidated* state: the whole
module (student, heads, EMA teacher) as float32 tensors and, for every trainable parameter, its
float32 master copy and full optimizer states (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``),
gathered from the ZeRO partitions to rank 0 on save and cut again into the partitions of the
resuming run on load, by DeepSpeed's own ``safe_get/set_full_fp32_param`` and
``safe_get/set_full_optimizer_state`` (ZeRO 1-3) or straight from the optimizer (stage 0). A run
saved by 2 workers under ZeRO-2 therefore resumes on 1 or 3 workers, under any stage.

Why consolidate on save rather than DeepSpeed's universal checkpoint: ``ds_to_universal`` is an
offline conversion of the per-rank files (every rank's optimizer pickle read by one process, with
``weights_only=False``), needs a ZeRO-1+ optimizer (no stage 0), and would have to run after a
node fault, before the elastic restart, on whatever storage holds the run. Consolidating costs a
gather per checkpoint (rank 0 holds the float32 state while writing: ~16 bytes per trainable and
4 per frozen parameter, written in ``TENSOR_FILE_BYTES`` files) and gives files any process can
read with safetensors, no pickle at all.

Files: ``model-NNNNN.safetensors`` (module state), ``optimizer-NNNNN.safetensors``
(``<param>::<state>`` tensors; ``fp32`` is the master copy), ``optimizer.json`` (the optimizer's
step count, fp16 loss scale), each rank's RNG state (safetensors with JSON metadata), the method's
extra state, ``train_state.json`` (step, world size, data position, history) and ``config.json``.
Each rank writes ``complete/rank_<r>`` last; a checkpoint missing any of them is refused at
restore. Ray Train registers a checkpoint only after every rank has reported it, so an
interrupted save is never the one ``ray.train.get_checkpoint()`` returns.

RNG on resume: at the world size that saved, every rank gets its own RNG state back (an exact
continuation); at another size every rank is reseeded from (``train.seed``, step, rank), since
there is no rank-for-rank correspondence (documented in docs/running.md).

Nothing here unpickles: everything is JSON or safetensors.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_ssl.config import Config, StorageConfig, to_dict
from ray_ssl.data.position import PassProgress
from ray_ssl.models.export import EXPORT_META, EXPORT_WEIGHTS
from ray_ssl.storage import resolve, write_bytes_atomic
from ray_ssl.train.safe_load import CheckpointError

log = logging.getLogger(__name__)

MODEL_PREFIX = "model"
OPTIMIZER_PREFIX = "optimizer"
OPTIMIZER_META = "optimizer.json"
MODULE_EXTRA_FILE = "module_extra.json"  # a module's non-tensor state (``get_extra_state``)
MASTER_KEY = "fp32"  # the float32 master copy of a trainable parameter
STATE_SEPARATOR = "::"
TENSOR_FILE_BYTES = 2 << 30  # split the consolidated state into files of at most ~2 GiB
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
    data: PassProgress = field(default_factory=PassProgress)  # the data position (global)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainState:
        data = PassProgress(**raw.pop("data", {}))
        return cls(**raw, data=data)


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


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Seed torch, numpy and Python from (seed, step, rank): a resume at another world size."""
    words = np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint32)
    torch.manual_seed(int(words[0]))
    np.random.seed(int(words[0]))
    random.seed(int(words[1]))


class TensorFileWriter:
    """Tensors into ``<prefix>-NNNNN.safetensors`` files of at most ~``limit`` bytes each, so the
    writer never holds more than one file's tensors."""

    def __init__(self, directory: Path, prefix: str, limit: int = TENSOR_FILE_BYTES) -> None:
        self.directory, self.prefix, self.limit = directory, prefix, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().float().cpu().contiguous()
        if self.pending and self.pending_bytes + tensor.nbytes > self.limit:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending and self.files:
            return
        path = self.directory / f"{self.prefix}-{self.files:05d}.safetensors"
        save_file(self.pending, str(path))
        self.pending, self.pending_bytes = {}, 0
        self.files += 1


class TensorFiles:
    """Read the tensors a :class:`TensorFileWriter` wrote, one at a time (no pickle)."""

    def __init__(self, directory: Path, prefix: str, name: str | None = None) -> None:
        from safetensors import SafetensorError, safe_open

        self.paths = sorted(directory.glob(f"{prefix}-*.safetensors"))
        if not self.paths:
            raise CheckpointError(
                f"checkpoint {name or directory} has no {prefix}-*.safetensors; it is "
                "incomplete or was written by an older ray-ssl (per-rank DeepSpeed files): start "
                "the run afresh under another train.run_name"
            )
        self.where: dict[str, Path] = {}
        try:
            for path in self.paths:
                with safe_open(str(path), framework="pt") as fh:
                    self.where.update(dict.fromkeys(fh.keys(), path))
        except SafetensorError as err:
            where = f"{name.rstrip('/')}/{path.name}" if name else path
            raise CheckpointError(
                f"checkpoint file {where} is not a safetensors file ({err}); it was not loaded: "
                "resume from a checkpoint written by ray-ssl, or delete this one"
            ) from err

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise CheckpointError(
                f"checkpoint tensor {name!r} is missing from {self.paths[0].parent}; it was "
                "saved by another model: choose another train.run_name"
            )
        with safe_open(str(self.where[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.where:
            yield name, self.get(name)


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps: wrapped by ZeRO 1-3, the engine's own at stage 0."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _state_keys(engine: Any) -> tuple[list[str], float | None]:
    """Names of the optimizer's per-element states (e.g. exp_avg) and its step count."""
    base = _base_optimizer(engine)
    for param_state in base.state.values():
        keys = [k for k, v in param_state.items() if torch.is_tensor(v) and v.dim() > 0]
        step = param_state.get("step")
        return sorted(keys), None if step is None else float(step)
    return [], None


def _zero12_fragment(engine: Any, param: nn.Parameter, key: str) -> torch.Tensor | None:
    """This rank's piece of ``param``'s master copy or optimizer state ``key`` under ZeRO 1-2
    (a view into the optimizer's flat float32 partition), or None if the rank holds none.

    Read from the optimizer's state directly rather than through the fragment's own table,
    which DeepSpeed 0.19 fills only in some code paths (empty after a restore or a skipped
    step)."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    flat = engine.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
    source = flat.data if key == MASTER_KEY else _base_optimizer(engine).state[flat][key]
    address = mapping.hp_fragment_address
    return source.narrow(0, address.start, address.numel)


def _full_state(engine: Any, param: nn.Parameter, key: str) -> torch.Tensor:
    """The whole of ``param``'s master copy (``MASTER_KEY``) or optimizer state ``key``, on
    every rank (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(param, "ds_id"):  # ZeRO-3
        if key == MASTER_KEY:
            return safe_get_full_fp32_param(param)
        return safe_get_full_optimizer_state(param, key)
    if hasattr(param, "_hp_mapping"):  # ZeRO 1-2: add up the ranks' pieces
        buffer = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        fragment = _zero12_fragment(engine, param, key)
        if fragment is not None:
            address = param._hp_mapping.lp_fragment_address
            buffer.narrow(0, address.start, address.numel).copy_(fragment)
        torch.distributed.all_reduce(buffer, group=getattr(param, "_dp_group", None))
        return buffer
    return param.detach() if key == MASTER_KEY else _base_optimizer(engine).state[param][key]


def _set_full_state(engine: Any, param: nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Write this rank's piece of ``value`` into ``param``'s master copy or state ``key``."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(param, "ds_id"):  # ZeRO-3
        if key == MASTER_KEY:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO 1-2
        fragment = _zero12_fragment(engine, param, key)
        if fragment is not None:
            address = param._hp_mapping.lp_fragment_address
            fragment.copy_(value.flatten().narrow(0, address.start, address.numel))
    else:
        target = param.data if key == MASTER_KEY else _base_optimizer(engine).state[param][key]
        target.copy_(value.reshape(target.shape))


def save_checkpoint(
    directory: str,
    engine: Any,
    state: TrainState,
    config: Config,
    rank: int,
) -> None:
    """Write this rank's part of a checkpoint into local ``directory`` (called on every rank;
    the consolidated state is gathered in collectives and written by rank 0)."""
    path = Path(directory)
    ds = engine.engine
    module_state = gathered_state_dict(engine.module, engine.module.state_dict, rank)
    keys, step = _state_keys(ds)
    optimizer_files = TensorFileWriter(path, OPTIMIZER_PREFIX)
    for name, param in _trainable(engine.module):
        for key in [MASTER_KEY, *keys]:
            value = _full_state(ds, param, key)
            if rank == 0:
                optimizer_files.add(f"{name}{STATE_SEPARATOR}{key}", value.reshape(-1))
    (path / RNG_DIR).mkdir(exist_ok=True)
    save_rng_state(path / RNG_DIR / f"rank_{rank}{RNG_SUFFIX}")
    if rank == 0:
        optimizer_files.flush()
        model_files = TensorFileWriter(path, MODEL_PREFIX)
        extra = {}
        for name, value in module_state.items():
            if torch.is_tensor(value):
                model_files.add(name, value)
            else:
                extra[name] = value
        model_files.flush()
        (path / MODULE_EXTRA_FILE).write_text(_extra_state_json(extra))
        scaler = getattr(ds.optimizer, "loss_scaler", None)
        meta = {"keys": keys, "step": step, "loss_scale": getattr(scaler, "cur_scale", None)}
        (path / OPTIMIZER_META).write_text(json.dumps(meta))
        engine.module.save_extra_state(str(path), state.step)
        (path / STATE_FILE).write_text(json.dumps(asdict(state)))
        (path / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=1))
    (path / COMPLETE_DIR).mkdir(exist_ok=True)
    (path / COMPLETE_DIR / f"rank_{rank}").write_text(str(state.step))


def _extra_state_json(extra: dict[str, Any]) -> str:
    """A module's non-tensor state entries as JSON (no pickle in a checkpoint)."""
    try:
        return json.dumps(extra)
    except TypeError as err:
        raise CheckpointError(
            f"module state {sorted(extra)} is neither tensors nor JSON ({err}); return plain "
            "numbers, strings, lists and dicts from get_extra_state"
        ) from None


def read_train_state(directory: str) -> TrainState:
    """The ``train_state.json`` of a checkpoint directory."""
    raw = json.loads((Path(directory) / STATE_FILE).read_text())
    return TrainState.from_json(raw)


def check_complete(directory: str) -> TrainState:
    """The checkpoint's state if every rank that wrote it finished writing."""
    path = Path(directory)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {directory} has no {STATE_FILE}; it is incomplete")
    state = read_train_state(directory)
    missing = [
        r for r in range(state.world_size) if not (path / COMPLETE_DIR / f"rank_{r}").is_file()
    ]
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks the shards of ranks {missing}")
    return state


def _optimizer_tensors(engine: Any) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps state for: ZeRO's flat float32 partitions (which
    ZeRO swaps into the optimizer's groups only while it steps), the parameters at stage 0."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    if stage in (1, 2):
        return list(engine.optimizer.single_partition_of_fp32_groups)
    return [p for g in _base_optimizer(engine).param_groups for p in g["params"]]


def _materialize_optimizer_state(engine: Any, keys: list[str], step: float | None) -> None:
    """Create the optimizer's (lazily made) states as zeros, for restore to overwrite: the
    per-element ``keys`` like each tensor, ``step`` as torch's optimizers keep it (a float32
    scalar tensor, on the device only for fused or capturable steps)."""
    base = _base_optimizer(engine)
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    for tensor in _optimizer_tensors(engine):
        state = base.state[tensor]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(tensor)
        if step is not None and "step" not in state:
            device = tensor.device if on_device else torch.device("cpu")
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)


def _load_module(engine: Any, model: TensorFiles, rank: int) -> None:
    """The whole module's tensors into the (possibly ZeRO-3-partitioned) module."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_tensor") for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=partitioned):
        if rank == 0 or not partitioned:
            state: dict[str, Any] = dict(model.items())
            extra = model.paths[0].parent / MODULE_EXTRA_FILE
            if extra.is_file():
                state.update(json.loads(extra.read_text()))
            missing = sorted(set(module.state_dict()) - set(state))
            if missing:
                raise CheckpointError(
                    f"checkpoint {model.paths[0].parent} lacks {missing[:3]}; it was saved by "
                    "another model: choose another train.run_name"
                )
            module.load_state_dict(state)


def _load_optimizer(engine: Any, directory: Path) -> None:
    """Every trainable parameter's master copy and optimizer states, cut into this run's
    partitions; then the optimizer's step count and loss scale."""
    ds = engine.engine
    meta = json.loads((directory / OPTIMIZER_META).read_text())
    files = TensorFiles(directory, OPTIMIZER_PREFIX)
    _materialize_optimizer_state(ds, meta["keys"], meta["step"])
    base = _base_optimizer(ds)
    with torch.no_grad():
        for name, param in _trainable(engine.module):
            for key in [MASTER_KEY, *meta["keys"]]:
                value = files.get(f"{name}{STATE_SEPARATOR}{key}").to(param.device)
                _set_full_state(ds, param, key, value)
    for param_state in base.state.values():
        if meta["step"] is not None and "step" in param_state:
            step = param_state["step"]
            if torch.is_tensor(step):
                step.fill_(meta["step"])
            else:
                param_state["step"] = type(step)(meta["step"])
    scaler = getattr(ds.optimizer, "loss_scaler", None)
    if meta.get("loss_scale") is not None and scaler is not None:
        scaler.cur_scale = meta["loss_scale"]


def restore_checkpoint(
    directory: str, engine: Any, rank: int, world_size: int, seed: int
) -> TrainState:
    """Load model, teacher, optimizer, RNG and method state from ``directory`` on every rank, at
    any world size and ZeRO stage (see the module docstring)."""
    state = check_complete(directory)
    path = Path(directory)
    _load_module(engine, TensorFiles(path, MODEL_PREFIX), rank)
    _load_optimizer(engine, path)
    engine.engine.global_steps = state.step
    if state.world_size == world_size:
        load_rng_state(path / RNG_DIR / f"rank_{rank}{RNG_SUFFIX}")
    else:
        reseed_rng(seed, state.step, rank)
    engine.module.load_extra_state(directory)
    log.info(
        "resumed from %s at step %d (saved by %d workers under ZeRO-%d; now %d workers, ZeRO-%d)",
        directory,
        state.step,
        state.world_size,
        state.zero_stage,
        world_size,
        engine.zero_stage,
    )
    state.world_size, state.zero_stage = world_size, engine.zero_stage
    return state


def gathered_state_dict(module: nn.Module, state_dict_fn: Any, rank: int) -> dict[str, Any]:
    """Full float32 CPU tensors of ``state_dict_fn()`` on rank 0 ({} elsewhere); a non-tensor
    entry (a module's ``get_extra_state``) passes through as it is.

    Under ZeRO-3 the parameters are gathered first, a collective: every rank must call this.
    """
    import deepspeed

    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_tensor") for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=partitioned):
        if rank != 0:
            return {}
        return {
            k: v.detach().float().cpu().clone() if torch.is_tensor(v) else v
            for k, v in state_dict_fn().items()
        }


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


def load_module_state(uri: str, storage: StorageConfig) -> dict[str, torch.Tensor]:
    """The whole module's float32 state dict from a checkpoint directory (local or ``s3://``),
    on the caller's CPU; reads only the ``model-*.safetensors`` files."""
    import tempfile

    loc = resolve(uri, storage)
    with tempfile.TemporaryDirectory(prefix="ray-ssl-ckpt-") as tmp:
        for remote in loc.fs.glob(loc.path.rstrip("/") + f"/{MODEL_PREFIX}-*.safetensors"):
            loc.fs.get(remote, f"{tmp}/{remote.rsplit('/', 1)[-1]}")
        return dict(TensorFiles(Path(tmp), MODEL_PREFIX, name=uri).items())
