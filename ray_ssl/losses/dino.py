"""DINO self-distillation loss on CLS tokens (Caron et al., arXiv 2104.14294; DINOv2 2304.07193).

Eq. (3) of DINO: sum over teacher global crops x and student crops x' != x of
H(P_t(x), P_s(x')) = -sum_k P_t(x)_k log softmax(s(x') / tau_s)_k. With G global and L local crops
there are G(G-1) global-global and G*L local-global pairs; as DINOv2 every pair has equal weight
and the loss is their mean (each pair's term is a mean over the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STUDENT_TEMP = 0.1  # DINO / DINOv2 / Franca


def cross_entropy(
    student_scores: torch.Tensor, targets: torch.Tensor, student_temp: float = STUDENT_TEMP
) -> torch.Tensor:
    """Per-row H(t, softmax(s / tau_s)) = -sum_k t_k log softmax(s / tau_s)_k, in fp32."""
    log_probs = F.log_softmax(student_scores.float() / student_temp, dim=-1)
    return -(targets.float() * log_probs).sum(dim=-1)


def dino_loss(
    student_global: torch.Tensor,
    student_local: torch.Tensor | None,
    teacher_targets: torch.Tensor,
    global_crops: int,
    student_temp: float = STUDENT_TEMP,
) -> torch.Tensor:
    """Mean cross-entropy over all (teacher global crop, other student crop) pairs (DINO eq. 3).

    Args:
        student_global: student scores [G*B, K], crop-major (row g*B+b = crop g of sample b).
        student_local: student scores [L*B, K] crop-major, or None when there are no local crops.
        teacher_targets: teacher assignments [G*B, K] crop-major (Sinkhorn-Knopp output).
        global_crops: G (>= 2).
    """
    if global_crops < 2:
        raise ValueError(f"DINO needs at least 2 global crops, got {global_crops}")
    targets = teacher_targets.float().unflatten(0, (global_crops, -1))  # [G, B, K]
    batch = targets.shape[1]
    target_sum = targets.sum(dim=0)  # sum over teacher crops, [B, K]
    student = student_global.unflatten(0, (global_crops, batch))
    log_probs = F.log_softmax(student.float() / student_temp, dim=-1)
    # Student global crop g is paired with every teacher global crop except its own view.
    total = -((target_sum - targets) * log_probs).sum(dim=-1).mean(dim=-1).sum()
    pairs = global_crops * (global_crops - 1)
    if student_local is not None and student_local.shape[0] > 0:
        local = student_local.unflatten(0, (-1, batch))
        local_log_probs = F.log_softmax(local.float() / student_temp, dim=-1)
        total = total - (target_sum * local_log_probs).sum(dim=-1).mean(dim=-1).sum()
        pairs += global_crops * local.shape[0]
    return total / pairs
