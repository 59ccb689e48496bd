"""Franca (Venkataramanan et al., arXiv 2507.14137): DINOv2-style self-distillation with nested
Matryoshka clustering heads, Sinkhorn-Knopp teacher targets, iBOT masked-patch prediction on
CyclicMask masks and KoLeo.

Student: ViT + Matryoshka DINO heads (CLS) + Matryoshka iBOT heads (masked patches). Teacher: the
same network without drop-path, an EMA of the student (``after_step``), never trained. Loss:
``dino_weight * sum_levels DINO + ibot_weight * sum_levels iBOT + koleo_weight * KoLeo``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ray_ssl.config import Config
from ray_ssl.losses.dino import dino_loss
from ray_ssl.losses.ibot import ibot_loss
from ray_ssl.losses.koleo import koleo_loss
from ray_ssl.losses.sinkhorn import sinkhorn_knopp
from ray_ssl.methods.base import Batch, Method
from ray_ssl.models.ema import copy_params_, ema_update_
from ray_ssl.models.heads import MatryoshkaHeads, is_last_layer_param
from ray_ssl.models.vit import build_vit, normalize_images


def teacher_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (DINO sec. 3.1, DINOv2)."""
    if step >= total_steps:
        return end
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``numpy.linspace(start, end, warmup_steps)[step]`` during warm-up, then ``end`` (DINOv2)."""
    if step >= warmup_steps:
        return end
    if warmup_steps <= 1:
        return start
    return start + (end - start) * step / (warmup_steps - 1)


class FrancaMethod(Method):
    """Franca teacher-student training step for the :class:`Method` contract.

    Batch: ``global_crops`` uint8 [G*B, C, Hg, Wg], ``local_crops`` uint8 [L*B, C, Hl, Wl] and
    ``masks`` bool [G*B, Np], all crop-major (row g*B + b is crop g of sample b).

    The heads' prototype layers are frozen for the first ``freeze_last_layer_epochs`` by using
    ``weight.detach()`` in their forward: no gradient reaches them, so there is nothing to cancel
    inside the DeepSpeed engine (any ZeRO stage); their learning rate is 0 meanwhile (DINOv2's
    rule, :meth:`frozen_until`).
    """

    def __init__(self, config: Config, steps_per_epoch: int, total_steps: int) -> None:
        super().__init__(config)  # checks the views (franca_settings.view_spec)
        model, franca = config.model, config.franca
        if steps_per_epoch < 1 or total_steps < 1:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch} and total_steps={total_steps} must be >= 1"
            )
        self.total_steps = total_steps
        self.teacher_temp_warmup_steps = min(
            franca.teacher_temp_warmup_epochs * steps_per_epoch, total_steps
        )
        self.freeze_last_layer_steps = franca.freeze_last_layer_epochs * steps_per_epoch
        self.student = self._build_network(config, drop_path=model.drop_path)
        self.teacher = self._build_network(config, drop_path=0.0)  # no drop-path, as DINOv2
        # Build-then-copy (not deepcopy) also works when parameters are born ZeRO-3-partitioned.
        copy_params_(self.teacher, self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    @staticmethod
    def _build_network(config: Config, drop_path: float) -> nn.ModuleDict:
        f = config.franca
        backbone = build_vit(dataclasses.replace(config.model, drop_path=drop_path))
        dim = backbone.embed_dim
        return nn.ModuleDict(
            {
                "backbone": backbone,
                "dino_head": MatryoshkaHeads(
                    dim,
                    f.prototypes,
                    f.head_hidden_dim,
                    f.head_bottleneck_dim,
                    f.head_layers,
                    f.nesting_levels,
                ),
                "ibot_head": MatryoshkaHeads(
                    dim,
                    f.ibot_prototypes,
                    f.head_hidden_dim,
                    f.ibot_head_bottleneck_dim,
                    f.head_layers,
                    f.nesting_levels,
                ),
            }
        )

    def frozen_until(self, name: str) -> int:
        """DINOv2 freezes the heads' prototypes (last layers) for the first epoch(s)."""
        return self.freeze_last_layer_steps if is_last_layer_param(name) else 0

    def backbone(self) -> nn.Module:
        """The EMA teacher's backbone (used for evaluation and export, as DINOv2)."""
        return self.teacher["backbone"]

    def train(self, mode: bool = True) -> FrancaMethod:
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no drop-path/dropout)
        return self

    def teacher_temp(self, step: int) -> float:
        f = self.config.franca
        return teacher_temperature(
            step, self.teacher_temp_warmup_steps, f.teacher_temp_warmup, f.teacher_temp
        )

    def momentum(self, step: int) -> float:
        f = self.config.franca
        return teacher_momentum(step, self.total_steps, f.momentum_start, f.momentum_end)

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        f = self.config.franca
        global_count = self.config.views.global_crops
        dtype = self.student["backbone"].mask_token.dtype
        global_crops = normalize_images(batch["global_crops"]).to(dtype)
        masks = batch["masks"].bool()
        if global_crops.shape[0] % global_count or masks.shape[0] != global_crops.shape[0]:
            raise ValueError(
                f"batch has {global_crops.shape[0]} global crops and {masks.shape[0]} masks; "
                f"expected {global_count} crops and masks per sample, crop-major"
            )
        local_crops = batch.get("local_crops")
        has_locals = local_crops is not None and local_crops.shape[0] > 0
        teacher_temp = self.teacher_temp(step)
        frozen = step < self.freeze_last_layer_steps

        dino_targets, ibot_targets = self._teacher_targets(global_crops, masks, teacher_temp)
        student = self.student["backbone"](global_crops, masks)
        cls_tokens = student.cls_token
        if has_locals:
            local = self.student["backbone"](normalize_images(local_crops).to(dtype))
            cls_tokens = torch.cat([cls_tokens, local.cls_token])
        rows = global_crops.shape[0]
        dino = sum(
            dino_loss(s[:rows], s[rows:] if has_locals else None, t, global_count, f.student_temp)
            for s, t in zip(
                self.student["dino_head"](cls_tokens, freeze_last_layer=frozen),
                dino_targets,
                strict=True,
            )
        )
        ibot = sum(
            ibot_loss(s, t, masks, f.student_temp)
            for s, t in zip(
                self.student["ibot_head"](student.patch_tokens[masks], freeze_last_layer=frozen),
                ibot_targets,
                strict=True,
            )
        )
        # KoLeo within each global crop (crop-major chunks), never across two crops of one image.
        koleo = sum(koleo_loss(c) for c in student.cls_token.chunk(global_count))
        # Each Matryoshka level adds one DINO and one iBOT term of weight 1 (summed above).
        loss = f.dino_weight * dino + f.ibot_weight * ibot + f.koleo_weight * koleo
        return {
            "loss": loss,
            "dino_loss": dino.detach(),
            "ibot_loss": ibot.detach(),
            "koleo_loss": koleo.detach(),
            "teacher_temp": loss.new_tensor(teacher_temp),
            "momentum": loss.new_tensor(self.momentum(step)),
        }

    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: torch.Tensor, masks: torch.Tensor, teacher_temp: float
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Sinkhorn-Knopp assignments per Matryoshka level: CLS of the unmasked global crops, and
        the patches the student sees masked (same crop, same position: iBOT)."""
        iterations = self.config.franca.sinkhorn_iterations
        teacher = self.teacher["backbone"](global_crops)
        dino = [
            sinkhorn_knopp(s, teacher_temp, iterations, distributed=True)
            for s in self.teacher["dino_head"](teacher.cls_token)
        ]
        ibot = [
            sinkhorn_knopp(s, teacher_temp, iterations, distributed=True)
            for s in self.teacher["ibot_head"](teacher.patch_tokens[masks])
        ]
        return dino, ibot

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA of the student into the teacher with this step's momentum."""
        ema_update_(self.teacher, self.student, self.momentum(step))
