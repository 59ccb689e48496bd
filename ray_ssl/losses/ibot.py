"""iBOT masked-patch loss (Zhou et al., arXiv 2111.07832 eq. 2; DINOv2 arXiv 2304.07193).

L_MIM = -sum_i m_i P_t(u_i)^T log P_s(u^_i): the student sees the masked crop, the teacher the
intact one, and each masked patch's student scores are pulled to the teacher's target at the same
patch. As DINOv2, each image's masked patches share weight 1/(its number of masked patches) and
the sum is divided by the number of images (masked or not), so every image counts equally.
"""

from __future__ import annotations

import torch

from ray_ssl.losses.dino import STUDENT_TEMP, cross_entropy


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """Weight 1/n_b of each masked patch, in ``masks.nonzero()`` (row-major) order; [M]."""
    per_image = 1.0 / masks.sum(dim=1).clamp_min(1).float()  # [N]
    return per_image.unsqueeze(1).expand_as(masks)[masks]


def ibot_loss(
    student_scores: torch.Tensor,
    teacher_targets: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = STUDENT_TEMP,
) -> torch.Tensor:
    """iBOT loss over the real masked patches only.

    Args:
        student_scores: student scores [M, K] of the masked patches, in ``masks.nonzero()`` order.
        teacher_targets: teacher assignments [M, K] for the same patches.
        masks: bool [N, Np] patch masks of the N global-crop images (M = masks.sum()).
    """
    if student_scores.shape[0] != int(masks.sum()):
        raise ValueError(
            f"{student_scores.shape[0]} masked-patch scores for {int(masks.sum())} masked patches"
        )
    weights = masked_patch_weights(masks)
    per_patch = cross_entropy(student_scores, teacher_targets, student_temp)
    return (per_patch * weights).sum() / max(masks.shape[0], 1)
