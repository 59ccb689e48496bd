"""Exponential moving average of a student's parameters into a teacher (DINO, arXiv 2104.14294).

theta_t <- m * theta_t + (1 - m) * theta_s, applied with ``torch._foreach_mul_``/``_foreach_add_``
over the parameters of the two modules, paired in ``named_parameters`` order (DINOv2's update).

Under DeepSpeed ZeRO-3 ``param.data`` is an empty placeholder outside a forward, and each rank
holds only its flat partition of every parameter in ``param.ds_tensor``. Teacher and student have
the same architecture, so each pair has the same numel and is partitioned the same way on every
rank: updating the local partitions (``ds_tensor``) in place is the full EMA, with no
communication. ZeRO-3 also keeps small parameters (below ``stage3_param_persistence_threshold``)
whole on every rank, refreshed from the partitions only inside ``engine.step()``; where a whole
copy is materialised on both sides it is updated too, so it never lags the partitions. Without
ZeRO-3 (no ``ds_tensor``) the full tensors are updated.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def _local_tensors(param: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What this rank stores of ``param``: (its data, None), or under ZeRO-3 (its partition, the
    whole copy if one is materialised: ZeRO-3 keeps small "persistent" parameters whole)."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        return param.data, None
    whole = param.data if param.data.numel() == param.ds_numel > 0 else None
    return partition, whole


def _paired_tensors(
    teacher: nn.Module, student: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    teacher_params = list(teacher.named_parameters())
    student_params = list(student.named_parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"teacher has {len(teacher_params)} parameters, student {len(student_params)}; "
            "the EMA needs two modules of the same architecture"
        )
    teacher_list, student_list = [], []
    for (t_name, t_param), (s_name, s_param) in zip(teacher_params, student_params, strict=True):
        (t_local, t_whole), (s_local, s_whole) = _local_tensors(t_param), _local_tensors(s_param)
        if t_name != s_name or t_local.shape != s_local.shape:
            raise ValueError(
                f"EMA parameter mismatch: teacher {t_name} {tuple(t_local.shape)} vs student "
                f"{s_name} {tuple(s_local.shape)}"
            )
        teacher_list.append(t_local)
        student_list.append(s_local)
        if t_whole is not None and s_whole is not None:
            teacher_list.append(t_whole)
            student_list.append(s_whole)
    return teacher_list, student_list


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    teacher_list, student_list = _paired_tensors(teacher, student)
    if not teacher_list:
        return
    dtype = teacher_list[0].dtype
    if dtype.is_floating_point and 0.0 < 1.0 - momentum < torch.finfo(dtype).eps:
        warnings.warn(
            f"EMA step 1-m={1.0 - momentum:.2g} is below the {dtype} resolution "
            f"({torch.finfo(dtype).eps:.2g}): the teacher barely moves; keep it in float32 "
            "(e.g. DeepSpeed torch_autocast rather than bf16 parameters)",
            RuntimeWarning,
            stacklevel=3,  # the caller of the no_grad-decorated function
        )
    torch._foreach_mul_(teacher_list, momentum)
    torch._foreach_add_(teacher_list, student_list, alpha=1.0 - momentum)


@torch.no_grad()
def copy_params_(teacher: nn.Module, student: nn.Module) -> None:
    """teacher <- student (the EMA's initial state); ZeRO-3 partitions as in :func:`ema_update_`."""
    teacher_list, student_list = _paired_tensors(teacher, student)
    if teacher_list:
        torch._foreach_copy_(teacher_list, student_list)
