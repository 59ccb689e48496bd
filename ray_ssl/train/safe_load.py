"""Reading checkpoint files without running code from them.

A checkpoint directory may sit on shared storage that others can write, and a pickle can run any
code while it is read. Every ``.pt`` file of a checkpoint is therefore read with
``torch.load(..., weights_only=True)``: tensors, plain containers and numbers, plus exactly the
non-tensor types DeepSpeed writes into its own checkpoints (:data:`DEEPSPEED_CHECKPOINT_GLOBALS`),
allowed only while DeepSpeed's files are read. A file that names anything else is refused with a
:class:`CheckpointError` before anything in it runs.

DeepSpeed 0.19 hard-codes ``weights_only=False`` in ``TorchCheckpointEngine.load`` and in
``deepspeed.utils.zero_to_fp32``: :func:`safe_deepspeed_loads` gives the engine a checkpoint
engine of ours for the duration of a load, and :func:`weights_only_loads` forces every
``torch.load`` of the process to ``weights_only=True`` around code that offers no such hook.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ray_ssl.errors import UserError

# torch's documented switch: while set, every torch.load uses weights_only=True, whatever it asks.
FORCE_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_BLOCKED_GLOBAL = re.compile(r"Trying to load unsupported GLOBAL (\S+)")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


def deepspeed_checkpoint_globals() -> list[Any]:
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoints; allowed only while
    reading them.

    Found by saving ZeRO-0/2/3 checkpoints (fp32 and bf16, CPU) and listing them with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``: the ZeRO optimizer file holds
    ``ZeroStageEnum``, ``LossScaler`` and (ZeRO 1-2) ``fragment_address``; model files hold none.
    An fp16 run's optimizer writes a ``DynamicLossScaler`` instead (``CreateLossScaler``).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _refusal(path: str | os.PathLike, err: Exception) -> CheckpointError:
    """One line naming the file and what it tried to load."""
    text = str(err)
    found = _REFUSED_GLOBAL.search(text) or _BLOCKED_GLOBAL.search(text)
    what = f"the Python object {found.group(1)}" if found else "Python objects"
    return CheckpointError(
        f"checkpoint file {os.fspath(path)} refers to {what}, which a checkpoint may not hold "
        "(reading it could run code); it was not loaded: resume from a checkpoint written by "
        "ray-ssl, or delete this one"
    )


@contextmanager
def refuse_unsafe(path: str | os.PathLike) -> Iterator[None]:
    """Turn torch's refusal of a ``weights_only`` load into a one-line :class:`CheckpointError`."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from err


def load_tensors(
    path: str | os.PathLike, map_location: Any = "cpu", name: str | None = None, **kwargs: Any
) -> Any:
    """``torch.load`` of a checkpoint file, refusing anything beyond tensors, plain data and the
    types DeepSpeed writes (see module docstring). ``name``: the file as the user knows it (a
    refusal names it), when ``path`` is a local copy."""
    with (
        refuse_unsafe(path if name is None else name),
        torch.serialization.safe_globals(deepspeed_checkpoint_globals()),
    ):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


def safe_checkpoint_engine(config_params: Any) -> Any:
    """A DeepSpeed ``TorchCheckpointEngine`` whose ``load`` is :func:`load_tensors`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_tensors(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine(config_params)


@contextmanager
def safe_deepspeed_loads(ds_engine: Any) -> Iterator[None]:
    """Within: ``ds_engine.load_checkpoint`` reads every file through :func:`load_tensors`.

    ``DeepSpeedEngine`` reads its model, optimizer and ZeRO partition files through
    ``engine.checkpoint_engine.load``; ours replaces it for the duration (saving is unchanged).
    """
    original = ds_engine.checkpoint_engine
    ds_engine.checkpoint_engine = safe_checkpoint_engine(ds_engine._config)
    try:
        yield
    finally:
        ds_engine.checkpoint_engine = original


@contextmanager
def weights_only_loads(directory: str | os.PathLike) -> Iterator[None]:
    """Within: every ``torch.load`` of this process is ``weights_only=True`` (torch's own
    switch), with DeepSpeed's checkpoint types allowed; for library code such as DeepSpeed's
    ``zero_to_fp32`` that hard-codes ``weights_only=False``. A refusal names ``directory``.

    The switch is process-wide while set: another thread's ``torch.load`` is only made stricter.
    """
    previous = os.environ.get(FORCE_WEIGHTS_ONLY_ENV)
    os.environ[FORCE_WEIGHTS_ONLY_ENV] = "1"
    try:
        with (
            refuse_unsafe(directory),
            torch.serialization.safe_globals(deepspeed_checkpoint_globals()),
        ):
            yield
    finally:
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY_ENV]
        else:
            os.environ[FORCE_WEIGHTS_ONLY_ENV] = previous
