"""Exponential moving average of a student's parameters into a teacher (DINO, arXiv 2104.14294).

theta_t <- m * theta_t + (1 - m) * theta_s, applied with ``torch._foreach_mul_``/``_foreach_add_``
over the parameters of the two modules, paired in ``named_parameters`` order (DINOv2's update).

Under DeepSpeed ZeRO-3 ``param.data`` is an empty placeholder outside a forward, and each rank
holds only its flat partition of every parameter in ``param.ds_tensor``. Teacher and student have
the same architecture, so each pair has the same numel and is partitioned the same way on every
rank: updating the local partitions (``ds_tensor``) in place is the full EMA, with no
communication. Without ZeRO-3 (no ``ds_tensor``) the full tensors are updated.
"""

from __future__ import annotations

import torch
from torch import nn


def _local_tensor(param: nn.Parameter) -> torch.Tensor:
    """This rank's storage of ``param``: its ZeRO-3 partition if partitioned, else its data."""
    partition = getattr(param, "ds_tensor", None)
    return partition if partition is not None else param.data


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
        t_local, s_local = _local_tensor(t_param), _local_tensor(s_param)
        if t_name != s_name or t_local.shape != s_local.shape:
            raise ValueError(
                f"EMA parameter mismatch: teacher {t_name} {tuple(t_local.shape)} vs student "
                f"{s_name} {tuple(s_local.shape)}"
            )
        teacher_list.append(t_local)
        student_list.append(s_local)
    return teacher_list, student_list


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    teacher_list, student_list = _paired_tensors(teacher, student)
    if not teacher_list:
        return
    torch._foreach_mul_(teacher_list, momentum)
    torch._foreach_add_(teacher_list, student_list, alpha=1.0 - momentum)


@torch.no_grad()
def copy_params_(teacher: nn.Module, student: nn.Module) -> None:
    """teacher <- student (the EMA's initial state); ZeRO-3 partitions as in :func:`ema_update_`."""
    teacher_list, student_list = _paired_tensors(teacher, student)
    if teacher_list:
        torch._foreach_copy_(teacher_list, student_list)
