"""Independent minimal references for ``benchmarks/quality.py``: plain PyTorch loops with lightly's
loss modules (lightly 1.6.0, the ``bench`` extra), torchvision transforms and timm backbones built
as the presets build theirs. Nothing here imports ray-ssl.

Each reference follows the recipe of the matching ray-ssl preset at the benchmark's length (no
warm-up, cosine to the preset's final lr), on Fashion-MNIST arrays held in memory:

- ``simclr``: ResNet-10t, lightly ``SimCLRProjectionHead(512, 512, 128)``, ``NTXentLoss(0.5)``,
  lightly ``LARS`` (lr 0.3 x B/256, wd 1e-6; biases and norms without decay and trust ratio).
- ``vicreg``: ResNet-10t, ``VICRegProjectionHead(512, 1024, 1024, 3)``, ``VICRegLoss()``
  (25/25/1), LARS lr 0.2 x B/256 to 1e-4.
- ``sag_vicreg``: the ``vicreg`` reference plus random-walk positives (arXiv 2506.18104), the
  walk written here from the sources ray-ssl's ``random_walk.py`` names (a self-tuning Gaussian
  kernel on each view's 10 nearest neighbours, sigma at the 7th, symmetrised by max; two steps of
  P = D^-1 W on the detached backbone features of the batch's 2N views; one partner per view, never
  itself nor its own augmentation); the invariance weight splits 0.5 / 0.5 between the two kinds
  of pair: ``VICRegLoss(lambda 25 x 0.5)`` + 25 x 0.5 x MSE(z, z[partner]).
- ``instdisc``: lemniscate.pytorch ``cifar.py --nce-k 0 --nce-t 0.1``: ResNet-10t + Linear(512,
  128) + L2 norm, a bank of N rows (``LinearAverage``: uniform init, momentum 0.5, renormalised),
  cross-entropy over the whole bank at temperature 0.1, SGD 0.03 constant, momentum 0.9, wd 5e-4.
  lightly's ``MemoryBankModule`` is a FIFO queue of recent keys with no row per instance, so
  with ``NTXentLoss`` it gives a two-view MoCo-style loss, not InstDisc's non-parametric softmax;
  this reference keeps the indexed bank of the original code instead.
- ``franca``: a minimal DINOv2-style student/teacher: ViT-Ti/4 (4 blocks) with a learned mask
  token, lightly ``DINOProjectionHead`` heads (256 hidden, 64 bottleneck, 1024 prototypes) for
  the CLS token and the masked patches, ``DINOLoss`` (2 global + 4 local crops) + ``IBOTPatchLoss``
  + 0.1 x ``KoLeoLoss`` per global crop, EMA teacher (0.994 -> 1, cosine), AdamW lr 4e-3 x
  sqrt(B/1024), wd 0.04 -> 0.2, clip 3. Its teacher targets are centred softmaxes (lightly), not
  Franca's Sinkhorn-Knopp, and it has one head per token kind, not Matryoshka nesting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss, NTXentLoss, VICRegLoss
from lightly.models.modules.heads import (
    DINOProjectionHead,
    SimCLRProjectionHead,
    VICRegProjectionHead,
)
from lightly.utils.lars import LARS
from PIL import Image
from torch import nn
from torchvision import transforms as T

GRAY_MEAN, GRAY_STD = 0.449, 0.226  # ImageNet mean/std averaged over RGB (ray-ssl's too)
BLUR_KERNEL = 9  # odd kernel spanning +-2 sigma at the recipes' largest sigma (2)
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128
CNN = "resnet10t"  # the presets' backbone for SimCLR, VICReg and InstDisc
CNN_WIDTH = 512
VIT = {"embed_dim": 192, "depth": 4, "num_heads": 3, "patch_size": 4, "img_size": 28}
DINO_HEAD = {"hidden_dim": 256, "bottleneck_dim": 64, "output_dim": 1024}  # local.yaml's franca
IMAGE_SIZE, LOCAL_SIZE = 28, 16
LOCAL_CROPS = 4
MASK_RATIO = (0.1, 0.65)  # Franca sec. 4
MASK_SAMPLE_P = 0.5  # share of global crops that are masked
VICREG_SIM = 25.0  # VICReg's lambda (Bardes et al. sec. 4.2), lightly's default
WALK = {"neighbors": 10, "scale_neighbor": 7, "steps": 2, "weight": 0.5}  # sag_vicreg_local's


@dataclass(frozen=True)
class RunSpec:
    """Length and seed of one training run."""

    steps: int
    batch: int
    seed: int


def crop(
    size: int,
    scale: tuple[float, float],
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    gray_p: float = 0.2,
    blur_p: float = 0.0,
    solarize_p: float = 0.0,
) -> T.Compose:
    """One augmented crop of a grayscale PIL image as a normalised tensor [1, size, size]."""
    ops: list[Callable] = [
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
        T.RandomGrayscale(gray_p),
    ]
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(BLUR_KERNEL, BLUR_SIGMA)], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize_p))
    return T.Compose([*ops, T.ToTensor(), T.Normalize((GRAY_MEAN,), (GRAY_STD,))])


def crops_for(method: str) -> list[T.Compose]:
    """The per-sample crops of each method's recipe (the presets' view settings)."""
    if method == "instdisc":  # lemniscate: RandomResizedCrop(0.2-1), jitter 0.4, gray, flip
        return [crop(IMAGE_SIZE, (0.2, 1.0), (0.4, 0.4, 0.4, 0.4), jitter_p=1.0)]
    if method == "simclr":
        strong = crop(IMAGE_SIZE, (0.2, 1.0), (0.8, 0.8, 0.8, 0.2), blur_p=0.5)
        return [strong, strong]
    if method in ("vicreg", "sag_vicreg"):
        return [
            crop(IMAGE_SIZE, (0.2, 1.0), blur_p=1.0),
            crop(IMAGE_SIZE, (0.2, 1.0), blur_p=0.1, solarize_p=0.2),
        ]
    if method == "franca":
        local = crop(LOCAL_SIZE, (0.1, 0.4), blur_p=0.5)
        return [
            crop(IMAGE_SIZE, (0.4, 1.0), blur_p=1.0),
            crop(IMAGE_SIZE, (0.4, 1.0), blur_p=0.1, solarize_p=0.2),
            *[local] * LOCAL_CROPS,
        ]
    raise ValueError(f"no reference for method '{method}'")


def batches(
    images: np.ndarray, crops: list[T.Compose], spec: RunSpec
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """``spec.steps`` batches of (dataset rows, one tensor per crop), epochs of seeded shuffles."""
    rng = np.random.default_rng(spec.seed)
    order = np.empty(0, dtype=np.int64)
    for _ in range(spec.steps):
        if len(order) < spec.batch:
            order = np.concatenate([order, rng.permutation(len(images))])
        rows, order = order[: spec.batch], order[spec.batch :]
        pil = [Image.fromarray(images[r]) for r in rows]
        yield torch.from_numpy(rows), [torch.stack([c(p) for p in pil]) for c in crops]


def cosine(step: int, total: int, base: float, final: float) -> float:
    """Half cosine from ``base`` at step 0 to ``final`` at ``total``."""
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * step / total))


def cnn() -> nn.Module:
    return timm.create_model(CNN, num_classes=0, in_chans=1)


def lars_groups(modules: nn.Module, weight_decay: float) -> list[dict]:
    """Weights with decay; biases and norms (1-d) without (lightly's LARS then skips them)."""
    decay = [p for p in modules.parameters() if p.ndim > 1]
    no_decay = [p for p in modules.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]


# (backbone features of view a, of view b, embeddings of view a, of view b) -> loss
TwoViewLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _two_view(
    images: np.ndarray,
    spec: RunSpec,
    method: str,
    head: nn.Module,
    loss_fn: TwoViewLoss,
    base_lr: float,
    min_lr: float,
) -> nn.Module:
    backbone = cnn().train()
    head.train()
    peak = base_lr * spec.batch / 256  # linear scaling (SimCLR sec. B.1, VICReg)
    optimizer = LARS(lars_groups(nn.Sequential(backbone, head), 1e-6), lr=peak, momentum=0.9)
    for step, (_, (first, second)) in enumerate(batches(images, crops_for(method), spec)):
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, spec.steps, peak, min_lr)
        h_a, h_b = backbone(first), backbone(second)
        loss = loss_fn(h_a, h_b, head(h_a), head(h_b))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return backbone


def simclr(images: np.ndarray, spec: RunSpec) -> nn.Module:
    head = SimCLRProjectionHead(CNN_WIDTH, CNN_WIDTH, 128)
    ntxent = NTXentLoss(temperature=0.5)
    return _two_view(
        images, spec, "simclr", head, lambda _a, _b, z_a, z_b: ntxent(z_a, z_b), 0.3, 0.0
    )


def vicreg_head() -> nn.Module:
    return VICRegProjectionHead(CNN_WIDTH, 1024, 1024, num_layers=3)


def vicreg(images: np.ndarray, spec: RunSpec) -> nn.Module:
    loss = VICRegLoss()
    return _two_view(
        images, spec, "vicreg", vicreg_head(), lambda _a, _b, z_a, z_b: loss(z_a, z_b), 0.2, 1e-4
    )


def walk_reach(features: torch.Tensor) -> torch.Tensor:
    """Where the walk from each row of ``features`` [2N, D] ends, as unnormalised probabilities
    [2N, 2N], with a row's own view and its other augmentation (rows i and i + N) set to 0."""
    nodes, k, scale = features.shape[0], WALK["neighbors"], WALK["scale_neighbor"]
    x = features.detach().double()
    squared = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    squared.fill_diagonal_(math.inf)
    nearest = squared.argsort(dim=1)[:, :k]
    sigma = squared.gather(1, nearest[:, scale - 1 : scale]).sqrt()  # Zelnik-Manor & Perona eq. 3
    affinity = torch.zeros_like(squared)
    for i in range(nodes):
        near = nearest[i]
        affinity[i, near] = torch.exp(-squared[i, near] / (sigma[i] * sigma[near, 0]))
    affinity = torch.maximum(affinity, affinity.T)
    walk = affinity / affinity.sum(dim=1, keepdim=True)
    reach = walk
    for _ in range(WALK["steps"] - 1):
        reach = reach @ walk
    rows = torch.arange(nodes)
    reach[rows, rows] = 0.0
    reach[rows, (rows + nodes // 2) % nodes] = 0.0
    return reach


def sag_vicreg(images: np.ndarray, spec: RunSpec) -> nn.Module:
    weight = WALK["weight"]
    two_view = VICRegLoss(lambda_param=VICREG_SIM * (1 - weight))
    generator = torch.Generator().manual_seed(spec.seed)

    def loss(
        h_a: torch.Tensor, h_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor
    ) -> torch.Tensor:
        reach = walk_reach(torch.cat([h_a, h_b])).float()
        partners = torch.multinomial(reach, 1, generator=generator).squeeze(1)
        z = torch.cat([z_a, z_b])
        return two_view(z_a, z_b) + VICREG_SIM * weight * F.mse_loss(z, z[partners])

    return _two_view(images, spec, "sag_vicreg", vicreg_head(), loss, 0.2, 1e-4)


def instdisc(images: np.ndarray, spec: RunSpec) -> nn.Module:
    """lemniscate ``cifar.py`` with ``--nce-k 0``: ``LinearAverage`` + cross-entropy."""
    dim, temperature, momentum = 128, 0.1, 0.5
    backbone, projection = cnn(), nn.Linear(CNN_WIDTH, dim)
    model = nn.Sequential(backbone, projection).train()
    stdv = 1.0 / math.sqrt(dim / 3)  # LinearAverage's initial memory: U(-stdv, stdv)
    bank = torch.rand(len(images), dim).mul_(2 * stdv).add_(-stdv)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
    for rows, (view,) in batches(images, crops_for("instdisc"), spec):
        features = F.normalize(model(view), dim=1)
        loss = F.cross_entropy(features @ bank.T / temperature, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            bank[rows] = F.normalize(momentum * bank[rows] + (1 - momentum) * features, dim=1)
    return backbone


class MaskedViT(nn.Module):
    """timm ViT whose masked patch tokens are replaced by a learned mask token (iBOT)."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=0,
            in_chans=1,
            dynamic_img_size=True,
            init_values=1e-5,
            **VIT,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, VIT["embed_dim"]))

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS [B, D], patch tokens [B, H*W, D]); ``masks`` bool [B, H, W]."""
        x = self.vit.patch_embed(images)  # [B, H, W, D] with dynamic_img_size
        if masks is not None:
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype), x)
        x = self.vit.norm(self.vit.blocks(self.vit.norm_pre(self.vit._pos_embed(x))))
        return x[:, 0], x[:, self.vit.num_prefix_tokens :]


def random_masks(count: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """bool [count, grid, grid]: the first half of the crops get a random share of patches."""
    masks = torch.zeros(count, grid * grid, dtype=torch.bool)
    for i in range(int(count * MASK_SAMPLE_P)):
        ratio = MASK_RATIO[0] + (MASK_RATIO[1] - MASK_RATIO[0]) * float(
            torch.rand(1, generator=generator)
        )
        chosen = torch.randperm(grid * grid, generator=generator)[: int(ratio * grid * grid)]
        masks[i, chosen] = True
    return masks[torch.randperm(count, generator=generator)].view(count, grid, grid)


def franca_network() -> nn.ModuleDict:
    """ViT + DINO (CLS) head + iBOT (patch) head."""
    dim = VIT["embed_dim"]
    return nn.ModuleDict(
        {
            "backbone": MaskedViT(),
            "dino": DINOProjectionHead(dim, **DINO_HEAD),
            "ibot": DINOProjectionHead(dim, **DINO_HEAD),
        }
    )


def franca(images: np.ndarray, spec: RunSpec) -> nn.Module:
    student = franca_network().train()
    teacher = franca_network().requires_grad_(False)  # weight_norm heads do not deepcopy
    teacher.load_state_dict(student.state_dict())
    dino_fn = DINOLoss(output_dim=DINO_HEAD["output_dim"], teacher_temp=0.07, student_temp=0.1)
    ibot_fn = IBOTPatchLoss(output_dim=DINO_HEAD["output_dim"], teacher_temp=0.07)
    koleo_fn = KoLeoLoss()
    peak = 4e-3 * math.sqrt(spec.batch / 1024)  # DINOv2 sqrt_wrt_1024
    patch_embed = [p for n, p in student.named_parameters() if "patch_embed" in n]
    decay = [p for n, p in student.named_parameters() if p.ndim > 1 and "patch_embed" not in n]
    no_decay = [p for n, p in student.named_parameters() if p.ndim <= 1 and "patch_embed" not in n]
    groups = [
        {"params": decay, "lr_mult": 1.0, "wd_mult": 1.0},
        {"params": no_decay, "lr_mult": 1.0, "wd_mult": 0.0},
        {"params": patch_embed, "lr_mult": 0.2, "wd_mult": 1.0},  # DINOv2 patch_embed_lr_mult
    ]
    optimizer = torch.optim.AdamW(groups, lr=peak)
    generator = torch.Generator().manual_seed(spec.seed)
    grid = IMAGE_SIZE // VIT["patch_size"]
    for step, (_, crops) in enumerate(batches(images, crops_for("franca"), spec)):
        lr, wd = cosine(step, spec.steps, peak, 1e-6), cosine(step, spec.steps, 0.04, 0.2)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr * group["lr_mult"], wd * group["wd_mult"]
        global_crops, local_crops = torch.cat(crops[:2]), torch.cat(crops[2:])
        masks = random_masks(global_crops.shape[0], grid, generator)
        flat = masks.flatten(1)
        with torch.no_grad():
            t_cls, t_patches = teacher["backbone"](global_crops)
            t_dino = teacher["dino"](t_cls).chunk(2)
            t_ibot = teacher["ibot"](t_patches[flat])
        s_cls, s_patches = student["backbone"](global_crops, masks)
        l_cls, _ = student["backbone"](local_crops)
        s_dino = student["dino"](torch.cat([s_cls, l_cls])).chunk(2 + LOCAL_CROPS)
        dino = dino_fn(list(t_dino), list(s_dino), teacher_temp=0.07)
        ibot = ibot_fn(t_ibot, student["ibot"](s_patches[flat]), masks)
        koleo = sum(koleo_fn(c) for c in s_cls.chunk(2))
        loss = dino + ibot + 0.1 * koleo
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        optimizer.step()
        momentum = cosine(step, spec.steps, 0.994, 1.0)
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    return ClsFeatures(teacher["backbone"])


class ClsFeatures(nn.Module):
    """The teacher's ViT as a plain feature extractor (CLS token after the final norm)."""

    def __init__(self, backbone: MaskedViT) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)[0]


REFERENCES: dict[str, Callable[[np.ndarray, RunSpec], nn.Module]] = {
    "franca": franca,
    "instdisc": instdisc,
    "vicreg": vicreg,
    "sag_vicreg": sag_vicreg,
    "simclr": simclr,
}


def train_reference(method: str, images: np.ndarray, spec: RunSpec) -> nn.Module:
    """Train the reference of ``method`` on uint8 images [N, 28, 28]; returns its backbone."""
    torch.manual_seed(spec.seed)
    return REFERENCES[method](images, spec).eval()
