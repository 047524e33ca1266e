"""Train the fine-resolution zoo ViTs: a DINO self-supervised backbone and its supervised twin.

    python benchmarks/training/train_dino.py [--only NAME ...] [--out captum_ext/zoo/weights]
        [--cache DIR] [--threads 1] [--device cpu] [--dino KEY=VALUE ...] [--probe KEY=VALUE ...]

Two entries on the fine benchmark data (``FINE``: 96 x 96 px, patch 8, a 12 x 12 token grid,
free layout, 1 or 2 objects of extent 16..40 px):

* ``shapes-vit-dino``: a conv-stem timm ViT (``zoo_vit_convstem``, as ``shapes-vit``; Xiao
  et al. 2021) trained self-supervised with DINO (Caron et al. 2021, "Emerging Properties in
  Self-Supervised Vision Transformers", arXiv:2104.14294) on the unlabelled training images,
  then frozen, with a linear head trained as the CDAM paper trains its head (Adam, random
  resized crop and horizontal flip, 10 epochs; BCE on the four classes, as every shapes
  model).
* ``shapes-vit-fine``: the same architecture, initialisation and training images, the
  backbone trained end to end with the labels instead, then frozen and given a fresh linear
  head with the same recipe. The two entries differ only in how the backbone was trained.

DINO, written here (``dino_loss``, ``DINOHead``, ``train_dino``) rather than taken from a
library: the loss and head are a few lines each, tested against the paper's equations in
float64 (``tests/test_dino_loss.py``), and lightly would bring pytorch-lightning and its own
augmentation stack into the training environment for nothing the zoo ships. Student and
teacher share the architecture; the teacher is an exponential moving average of the student
(momentum cosine from ``momentum`` to 1), its outputs are centred (centre an EMA of the batch
mean of teacher outputs) and sharpened (temperature ``teacher_temp`` < ``student_temp``); the
loss is the cross-entropy between teacher and student softmaxes over every pair of different
views, the teacher seeing the 2 global crops (``global_size``, 48 px by default) and the
student those plus ``n_local`` local crops (24 px; position embeddings resampled).
Augmentations are batched tensor ops (random resized crop and flip by ``grid_sample``, colour
jitter, channel permutation, greyscale, solarisation of the second global view); with
``recolour`` (the default) every view is cropped from its own recolouring of the image
(``captum_ext.data.recolour``), so that colour, which carries no class information in this
data, cannot be matched between views at all. ``--cache`` keeps the run state every 250
steps (an interrupted run continues from it) and the trained backbone with its training
record (a rerun, e.g. with another head recipe via ``--probe``, reuses it).

Measured accuracies, times and file sizes: ``benchmarks/results/training.md``; every record
holds its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_zoo import (
    DEFAULT_OUT,
    HELDOUT_N,
    HELDOUT_SEED,
    set_accuracy,
)

from captum_ext.checkpoint import save_checkpoint, verify_checkpoint
from captum_ext.data import SHAPE_CLASSES, ShapesDataset, recolour
from captum_ext.zoo._build import build_model

__all__ = [
    "ENTRIES",
    "FINE",
    "DINOConfig",
    "DINOHead",
    "FineEntry",
    "ProbeConfig",
    "augment_colour",
    "config_overrides",
    "dino_loss",
    "forward_tokens",
    "koleo_loss",
    "linear_probe",
    "main",
    "new_model",
    "parse_field",
    "random_resized_crop",
    "sinkhorn_knopp",
    "train_dino",
    "train_entry",
    "train_supervised",
    "whiten_conv_stem",
]

FINE: dict[str, Any] = dict(
    layout="free", max_objects=2, size=96, patch=8, min_extent=16, max_extent=40
)
"""Data of the fine benchmark: a 12 x 12 token grid, objects spanning 2 to 5 tokens."""

_VIT = dict(
    img_size=96,
    patch_size=8,
    embed_dim=64,
    depth=4,
    num_heads=2,
    mlp_ratio=4.0,
    num_classes=len(SHAPE_CLASSES),
    stem_chs=[16, 16, 32, 64],
    stem_strides=[1, 2, 2, 2],
)
_ARCH: dict[str, Any] = {
    "family": "vit",
    "library": "timm",
    "arch": "zoo_vit_convstem",
    "model_kwargs": _VIT,
}
"""The fine entries' architecture, as their records state it (:func:`build_model`'s input)."""
_WHITEN = {"name": "stem-whitening", "eps": 1e-3, "n_images": 1024, "data_seed": 7}
TRAIN_SEED = 11
"""Data seed of the backbones' training images (unlabelled for DINO, labelled for the twin)."""
TRAIN_N = 16384
PROBE_SEED = 13
PROBE_N = 16384


@dataclass(frozen=True)
class DINOConfig:
    """The DINO recipe.

    Defaults: the first recipe whose class token learns the classes (run W of
    ``benchmarks/results/training.md``: views recoloured, global crops at 48 px; 5000 steps
    gave held-out 0.437 with the linear head, against 0.031 for run N's recipe without
    recolouring), stretched to 20000 steps: the recipe of the shipped ``shapes-vit-dino``
    (held-out 0.971 with the 16384-image head). ``centering``: ``"centre"`` (DINO's EMA
    centre) or ``"sinkhorn"`` (DINOv2's Sinkhorn-Knopp); ``koleo``: weight of DINOv2's KoLeo
    term on the global views' class tokens (0: off); ``colour_mix``: random colour mixing and
    inversion instead of the channel permutation (:func:`augment_colour`); ``recolour``: crop
    every view from its own recolouring of the image (``captum_ext.data.recolour``: new
    background, object colours and noise, the layout kept), so that views share only their
    geometry; ``global_size``: side of the global crops in pixels (0: the image's), smaller
    for cheaper steps (position embeddings resampled, as for the local crops).
    """

    steps: int = 20000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_frac: float = 0.1
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    momentum: float = 0.996
    student_temp: float = 0.1
    teacher_temp: float = 0.02
    center_momentum: float = 0.9
    centering: str = "centre"
    koleo: float = 0.1
    out_dim: int = 128
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    head_bn: bool = True
    n_local: int = 4
    global_scale: tuple[float, float] = (0.6, 1.0)
    local_scale: tuple[float, float] = (0.2, 0.5)
    colour_mix: bool = False
    recolour: bool = True
    global_size: int = 48
    local_size: int = 24
    freeze_last_layer_steps: int = 50


@dataclass(frozen=True)
class SupervisedConfig:
    """End-to-end supervised recipe of the twin's backbone (AdamW, one-cycle cosine, flips)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05


@dataclass(frozen=True)
class ProbeConfig:
    """The linear head's recipe, as the CDAM paper trains its head.

    Adam, random resized crop (``scale``) and horizontal flip, ``epochs`` epochs over
    ``n_train`` images (16384: why, in ``benchmarks/results/training.md``), BCE on the four
    classes. The crop scale is narrower than torchvision's default (0.08..1) because the
    labels of a multi-object image stay true only while the crop keeps every object.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    scale: tuple[float, float] = (0.6, 1.0)
    n_train: int = PROBE_N
    data_seed: int = PROBE_SEED


@dataclass(frozen=True)
class FineEntry:
    """A fine-resolution zoo entry: backbone training (``"dino"`` or ``"supervised"``) + probe."""

    name: str
    backbone: str
    seed: int = 0
    dino: DINOConfig = DINOConfig()
    supervised: SupervisedConfig = SupervisedConfig()
    probe: ProbeConfig = ProbeConfig()
    notes: str = ""


ENTRIES: dict[str, FineEntry] = {
    e.name: e
    for e in (
        FineEntry(
            "shapes-vit-dino",
            "dino",
            notes=(
                "Self-supervised (DINO) conv-stem ViT at 96 px, patch 8 (12x12 tokens), "
                "frozen, with a linear head trained alone (Adam, random resized crop + flip, "
                "10 epochs), as in the CDAM paper. Twin: shapes-vit-fine (same architecture, "
                "init and images, backbone trained with labels)."
            ),
        ),
        FineEntry(
            "shapes-vit-fine",
            "supervised",
            notes=(
                "Supervised twin of shapes-vit-dino: same architecture, stem-whitening init, "
                "seed and training images; the backbone trained end to end with the labels "
                "(its head then discarded), frozen, and a fresh linear head trained with the "
                "same recipe as shapes-vit-dino's. The two differ only in how the backbone "
                "was trained."
            ),
        ),
    )
}


# --------------------------------------------------------------------------------------------
# model pieces


def forward_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features ``(B, D)`` of a timm ViT for images of any size divisible by the patch.

    At the model's own size this is ``forward_head(forward_features(x), pre_logits=True)``;
    for other sizes (the local crops) the absolute position embeddings are resampled
    (bicubic, timm's ``resample_abs_pos_embed``) to the smaller grid.
    """
    from timm.layers import resample_abs_pos_embed

    pe = model.patch_embed
    if tuple(x.shape[-2:]) == tuple(pe.img_size):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    p = pe.patch_size[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    tokens = pe.proj(x).flatten(2).transpose(1, 2)
    tokens = pe.norm(tokens)
    prefix = model.num_prefix_tokens
    pos = resample_abs_pos_embed(
        model.pos_embed, grid, old_size=pe.grid_size, num_prefix_tokens=prefix
    )
    cls = model.cls_token.expand(x.shape[0], -1, -1)
    tokens = torch.cat([cls, tokens], dim=1) + pos
    tokens = model.norm_pre(model.patch_drop(model.pos_drop(tokens)))
    tokens = model.norm(model.blocks(tokens))
    return model.forward_head(tokens, pre_logits=True)


@torch.no_grad()
def whiten_conv_stem(model: nn.Module, init: dict[str, Any], data_kwargs: dict[str, Any]) -> None:
    """Initialise a conv-stem ViT's last (1x1) stem convolution by PCA whitening.

    At random initialisation the conv-BN-ReLU blocks of the stem output positive features
    with a large common component, so every token, and the class token after the blocks, is
    nearly the same vector for every image (feature std across images about 0.02 against 0.2
    across tokens): DINO then starts at its uniform-collapse fixed point and does not leave it.
    Here the BatchNorm running statistics are first estimated on ``init["n_images"]`` images
    (seed ``init["data_seed"]``, cumulative average), then the 1x1 convolution is set to
    ``diag(1 / sqrt(lambda + eps)) V^T (f - mean)`` for the principal components ``V`` with
    variances ``lambda`` of the stem features ``f`` of those images: every token feature
    starts centred, with unit variance and decorrelated. The running statistics are kept.

    Args:
        model: A timm ``VisionTransformer`` whose ``patch_embed.proj`` is a conv stem ending
            in a 1x1 ``Conv2d`` to ``embed_dim`` (``zoo_vit_convstem``).
        init: ``{"eps", "n_images", "data_seed"}``.
        data_kwargs: Keyword arguments of :class:`captum_ext.data.ShapesDataset`.
    """
    stem = model.patch_embed.proj
    last = stem[-1] if isinstance(stem, nn.Sequential) else stem
    if not (
        isinstance(stem, nn.Sequential)
        and isinstance(last, nn.Conv2d)
        and last.kernel_size == (1, 1)
    ):
        raise ValueError(
            f"whiten_conv_stem needs a conv stem ending in a 1x1 Conv2d, got {type(last).__name__}"
            f" with kernel {getattr(last, 'kernel_size', None)}"
        )
    body = stem[:-1]
    data = ShapesDataset(init["n_images"], init["data_seed"], **data_kwargs)
    chunks = [
        _images(data, torch.arange(i, min(len(data), i + 256)))[0] for i in range(0, len(data), 256)
    ]
    bns = [m for m in body if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the chunks
        body.train()
        for x in chunks:
            body(x)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
    body.eval()
    feats = torch.cat([body(x).permute(0, 2, 3, 1).reshape(-1, last.in_channels) for x in chunks])
    feats = feats.double()
    mean = feats.mean(0)
    lam, vec = torch.linalg.eigh(torch.cov((feats - mean).T))  # ascending
    d = last.out_channels
    lam, vec = lam.flip(0)[:d], vec.flip(1)[:, :d]
    if vec.shape[1] < d:
        raise ValueError(f"stem width {last.in_channels} < embed_dim {d}: cannot whiten")
    w = (vec / (lam.clamp_min(0) + init["eps"]).sqrt()).T
    last.weight.copy_(w.reshape(last.weight.shape).float())
    last.bias.copy_((-(w @ mean)).float())


class DINOHead(nn.Module):
    """DINO projection head: a 3-layer MLP, L2 normalisation, a weight-normalised linear layer.

    Args:
        in_dim: Backbone feature width.
        out_dim: Number of prototypes ``K`` (softmax width).
        hidden_dim: Width of the MLP's hidden layers.
        bottleneck_dim: Output width of the MLP (the normalised embedding).
        bn: BatchNorm after the hidden linear layers (DINO's ``use_bn`` option).
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, bn: bool = False
    ) -> None:
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if bn else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Weight normalisation with the norm fixed at 1: the prototypes are unit vectors.
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` of features ``(B, in_dim)``."""
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.last_v, dim=-1).T


def new_model(whiten: dict[str, Any] = _WHITEN) -> nn.Module:
    """The fine entries' architecture (:data:`_ARCH`), initialised by :func:`whiten_conv_stem`
    with ``whiten`` on the fine data; on the CPU."""
    model = build_model(_ARCH)
    whiten_conv_stem(model, whiten, FINE)
    return model


def config_overrides(items: Sequence[str], config: type = DINOConfig) -> dict[str, Any]:
    """Field values of the recipe dataclass ``config`` (``DINOConfig`` or ``ProbeConfig``)
    from ``KEY=VALUE`` texts (:func:`parse_field`).

    Raises:
        ValueError: An item without ``=``, an unknown field (the message lists the fields) or
            a value its field cannot take.
    """
    kinds = {f.name: type(getattr(config(), f.name)) for f in fields(config)}
    over: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in kinds:
            raise ValueError(
                f"expected KEY=VALUE with a {config.__name__} field, got {item!r}; fields: "
                f"{', '.join(kinds)}"
            )
        over[key] = parse_field(kinds[key], value)
    return over


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo spreading term (DINOv2; Sablayrolles et al. 2019, arXiv:1806.03198).

    ``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)`` over the L2-normalised rows ``x_i`` of
    ``features`` (``(B, D)``, ``B >= 2``): large when two images have nearly the same feature,
    so adding it pushes the batch's features apart; it is what keeps the backbone from
    mapping every image to one vector before the DINO loss has found features that match
    views.
    """
    if features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows, got {features.shape[0]}")
    x = F.normalize(features, dim=-1)
    d = torch.cdist(x, x)
    d = d + torch.diag(torch.full((x.shape[0],), float("inf"), dtype=d.dtype, device=d.device))
    return -(d.min(dim=1).values + eps).log().mean()


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher probabilities with equal prototype marginals (DINOv2's Sinkhorn-Knopp centring).

    ``Q = exp(logits / temp)`` (``(N, K)``), then ``iterations`` rounds of rescaling its
    columns to sum ``1 / K`` and its rows to sum ``1 / N``; returned times ``N``, so every row
    is a distribution over the ``K`` prototypes and, to the extent the iterations converge,
    every prototype receives the same share of the batch (Oquab et al. 2023, arXiv:2304.07193;
    Caron et al. 2020, SwAV). It rules out the one-prototype collapse without a running centre,
    not the uniform one: identical logits for every image give uniform rows, which meet the
    marginals too.

    Args:
        logits: Teacher logits of every image of every global view, ``(N, K)``.
        temp: The teacher temperature ``tau_t``.
        iterations: Sinkhorn rounds (DINOv2: 3).

    Returns:
        ``(N, K)`` probabilities (rows sum to 1).
    """
    q = ((logits - logits.max()) / temp).exp().T  # (K, N)
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).T


def dino_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    center: torch.Tensor | None,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """The DINO loss of one batch (Caron et al. 2021, eq. 2 and 3).

    ``P_t = softmax((g_t - c) / tau_t)`` for every teacher view (centred and sharpened, no
    gradient), ``P_s = softmax(g_s / tau_s)`` for every student view, and the loss is the mean
    over the pairs of different views (teacher view ``i``, student view ``j != i``) of the
    batch mean of ``-sum_k P_t[k] log P_s[k]``. The teacher views are the first
    ``len(teacher)`` student views (the global crops). With ``center=None`` the teacher
    probabilities come from :func:`sinkhorn_knopp` over all teacher views of the batch
    instead (DINOv2's centring).

    Args:
        student: Student logits per view, each ``(B, K)``; global views first.
        teacher: Teacher logits per global view, each ``(B, K)``.
        center: The centre ``c``, shape ``(K,)``, or None for Sinkhorn-Knopp centring.
        student_temp: ``tau_s``.
        teacher_temp: ``tau_t``.

    Returns:
        The scalar loss.
    """
    if len(student) < 2 or len(teacher) > len(student):
        raise ValueError(
            f"dino_loss needs at least 2 student views and at most as many teacher views, got "
            f"{len(student)} student and {len(teacher)} teacher views"
        )
    log_s = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    if center is None:
        p_t = list(sinkhorn_knopp(torch.cat(list(teacher)), teacher_temp).split(len(teacher[0])))
    else:
        p_t = [F.softmax((t - center) / teacher_temp, dim=-1).detach() for t in teacher]
    total, terms = 0.0, 0
    for i, pt in enumerate(p_t):
        for j, ls in enumerate(log_s):
            if i == j:
                continue
            total = total + (-(pt * ls).sum(dim=-1)).mean()
            terms += 1
    return total / terms


# --------------------------------------------------------------------------------------------
# augmentations (batched)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_resized_crop(
    x: torch.Tensor,
    out: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Batched random resized crop (and horizontal flip with probability 1/2).

    Per image: an area fraction uniform in ``scale`` and a log-uniform aspect ratio in
    ``ratio`` (clipped to fit the image), a uniform position, resampled bilinearly to
    ``out`` x ``out`` with ``grid_sample``.

    Args:
        x: Images ``(B, C, H, W)`` with ``H == W``.
        out: Output side in pixels.
        scale: Range of the crop's area as a fraction of the image.
        generator: Random source.
        ratio: Range of the crop's width / height.
        flip: Mirror each crop left-right with probability 1/2.

    Returns:
        Crops ``(B, C, out, out)``.
    """
    b = x.shape[0]
    area = _uniform(b, *scale, generator)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)  # fractions of the side
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * (1 - w) + w / 2) * 2 - 1
    cy = (torch.rand(b, generator=generator) * (1 - h) + h / 2) * 2 - 1
    sign = torch.ones(b)
    if flip:
        sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_colour(
    x: torch.Tensor, generator: torch.Generator, solarize: float = 0.0, mix: bool = False
) -> torch.Tensor:
    """Batched colour augmentation for DINO views (images in [0, 1]).

    Random channel permutation, brightness and contrast jitter (factors in 0.6..1.4),
    saturation jitter (0.8..1.2), greyscale with probability 0.2 and solarisation
    (``1 - x`` above 0.5) with probability ``solarize``. With ``mix`` the permutation is
    replaced by a random colour mixing (each output channel a random convex combination of
    the input channels, then inverted, ``1 - c``, with probability 1/2): colours then tell
    two views of one image apart as well as two images, while edges and shapes stay.
    """
    b = x.shape[0]
    if mix:
        weights = torch.rand(b, 3, 3, generator=generator)
        weights = weights / weights.sum(dim=2, keepdim=True)
        x = torch.einsum("boc,bchw->bohw", weights, x)
        invert = (torch.rand(b, 3, generator=generator) < 0.5)[:, :, None, None]
        x = torch.where(invert, 1 - x, x)
    else:
        perm = torch.argsort(torch.rand(b, 3, generator=generator), dim=1)
        x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    bright = _uniform(b, 0.6, 1.4, generator)[:, None, None, None]
    x = (x * bright).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(b, 0.6, 1.4, generator)[:, None, None, None]
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    sat = _uniform(b, 0.8, 1.2, generator)[:, None, None, None]
    x = ((x - grey) * sat + grey).clamp(0, 1)
    to_grey = (torch.rand(b, generator=generator) < 0.2)[:, None, None, None]
    x = torch.where(to_grey, grey.expand_as(x), x)
    if solarize > 0:
        sol = (torch.rand(b, generator=generator) < solarize)[:, None, None, None]
        x = torch.where(sol & (x > 0.5), 1 - x, x)
    return x


def _views(
    bases: Sequence[torch.Tensor], cfg: DINOConfig, g: torch.Generator
) -> list[torch.Tensor]:
    """The 2 global and ``n_local`` local views, view ``k`` cropped from ``bases[k]``."""
    size = cfg.global_size or bases[0].shape[-1]
    mix = cfg.colour_mix
    views = [
        augment_colour(random_resized_crop(bases[0], size, cfg.global_scale, g), g, mix=mix),
        augment_colour(
            random_resized_crop(bases[1], size, cfg.global_scale, g), g, solarize=0.2, mix=mix
        ),
    ]
    views += [
        augment_colour(random_resized_crop(x, cfg.local_size, cfg.local_scale, g), g, mix=mix)
        for x in bases[2 : 2 + cfg.n_local]
    ]
    return views


def _bases(
    data: ShapesDataset, idx: torch.Tensor, cfg: DINOConfig, g: torch.Generator
) -> list[torch.Tensor]:
    """The images every view of a batch is cropped from: the batch itself, or with
    ``cfg.recolour`` one fresh recolouring of it per view (:func:`captum_ext.data.recolour`)."""
    n_views = 2 + cfg.n_local
    if not cfg.recolour:
        return [_images(data, idx)[0]] * n_views
    params = [data.params(i) for i in idx.tolist()]
    seeds = torch.randint(0, 2**31 - 1, (n_views,), generator=g).tolist()
    return [recolour(params, s)[0] for s in seeds]


# --------------------------------------------------------------------------------------------
# training


def _cosine(step: int, steps: int, base: float, final: float, warmup: int = 0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def _images(data: ShapesDataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    items = data.__getitems__(idx.tolist())
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


class _IndexBatches:
    """Endless batches of indices ``0..n-1`` in random order: a fresh permutation (from
    ``generator``) whenever fewer than ``batch_size`` indices are left in the current one.
    ``order`` and ``pos`` are its whole state (kept in DINO checkpoints)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order, self.pos = torch.randperm(n, generator=generator), 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
        self.pos += self.batch_size
        return self.order[self.pos - self.batch_size : self.pos]


def _batches(
    data: ShapesDataset, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(images, labels)`` batches of ``data`` in random order (:class:`_IndexBatches`)."""
    for idx in _IndexBatches(len(data), batch_size, generator):
        yield _images(data, idx)


def _save_dino_state(
    path: Path,
    parts: dict[str, nn.Module],
    opt: torch.optim.Optimizer,
    extra: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Everything a DINO run needs to continue, as one safetensors file (atomic replace)."""
    from safetensors.torch import save_file

    tensors = {
        f"{name}.{k}": v.detach().cpu().contiguous()
        for name, module in parts.items()
        for k, v in module.state_dict().items()
    }
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors.update({k: v.detach().cpu().contiguous() for k, v in extra.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"dino_state": json.dumps(meta)})
    os.replace(tmp, path)


def _require_recipe(have: dict[str, Any], want: dict[str, Any], what: str, remedy: str) -> None:
    """Raise ``ValueError("<what> (differs in <fields>); <remedy>")`` unless the recipe a file
    recorded (``have``) is the one wanted."""
    if have != want:
        differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ValueError(f"{what} (differs in {', '.join(differ)}); {remedy}")


def _load_dino_state(
    path: Path, parts: dict[str, nn.Module], opt: torch.optim.Optimizer, recipe: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore a :func:`_save_dino_state` file into ``parts`` and ``opt``; returns the other
    tensors and the metadata.

    Raises:
        ValueError: The file was written by a run with another recipe or step count.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["dino_state"])
    _require_recipe(
        meta["recipe"],
        recipe,
        f"DINO checkpoint {path} belongs to another recipe",
        "delete it or train with its recipe",
    )
    tensors = load_file(str(path))
    for name, module in parts.items():
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        module.load_state_dict(own)
    state = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state["state"].setdefault(int(i), {})[k] = v
    opt.load_state_dict(state)
    rest = {k: v for k, v in tensors.items() if k.split(".")[0] not in {*parts, "opt"}}
    return rest, meta


def train_dino(
    model: nn.Module,
    data: ShapesDataset,
    cfg: DINOConfig,
    generator: torch.Generator,
    *,
    steps: int | None = None,
    progress: bool = True,
    desc: str = "dino",
    checkpoint: Path | None = None,
    checkpoint_every: int = 250,
    stats: dict[str, Any] | None = None,
) -> list[float]:
    """DINO self-distillation of ``model``'s backbone on the (unlabelled) images of ``data``.

    The student is ``model`` (trained in place) with a :class:`DINOHead`; the teacher a copy
    of both, updated as an EMA of the student. Labels of ``data`` are never read. The head
    is discarded afterwards.

    Args:
        model: A timm ViT (its classifier is ignored).
        data: The training images.
        cfg: The recipe.
        generator: Random source of batch order and augmentations.
        steps: Overrides ``cfg.steps`` (tests); the schedules are stretched to it.
        progress: Show a tqdm bar.
        desc: Progress bar label.
        checkpoint: A file where the whole run state (student, teacher, heads, optimizer,
            centre, random streams, losses) is saved every ``checkpoint_every`` steps and
            from which a run with the same recipe continues; an interrupted run resumed this
            way ends exactly as an uninterrupted one. None: no checkpoints.
        checkpoint_every: Steps between checkpoints.
        stats: If given, filled with ``seconds`` (training time over every resumed part)
            and ``resumed_at`` (the steps the run continued from).

    Returns:
        The loss of every step.

    Raises:
        ValueError: An unknown centring, or a checkpoint of another recipe.
    """
    import copy

    steps = cfg.steps if steps is None else steps
    if cfg.centering not in ("centre", "sinkhorn"):
        raise ValueError(f"centering must be 'centre' or 'sinkhorn', got {cfg.centering!r}")
    device = next(model.parameters()).device
    head = DINOHead(
        model.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, bn=cfg.head_bn
    ).to(device)
    # The teacher runs in train mode, as in DINO: its BatchNorms (conv stem, head) normalise
    # with batch statistics and keep their own running statistics, which the backbone keeps.
    t_model, t_head = copy.deepcopy(model).train(), copy.deepcopy(head).train()
    for p in [*t_model.parameters(), *t_head.parameters()]:
        p.requires_grad_(False)
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    s_params = [*model.parameters(), *head.parameters()]
    t_params = [*t_model.parameters(), *t_head.parameters()]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
    )
    center = torch.zeros(cfg.out_dim, device=device)
    warmup = int(cfg.warmup_frac * steps)
    freeze = min(cfg.freeze_last_layer_steps, steps // 10)
    batches = _IndexBatches(len(data), cfg.batch_size, generator)
    parts = {"student": model, "head": head, "teacher": t_model, "t_head": t_head}
    recipe = json.loads(json.dumps({**asdict(cfg), "steps": steps}))  # as a checkpoint reads it
    losses: list[float] = []
    first, seconds, resumed_at = 0, 0.0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        rest, meta = _load_dino_state(Path(checkpoint), parts, opt, recipe)
        center.copy_(rest["center"])
        generator.set_state(rest["generator"])
        batches.order, batches.pos = rest["order"], meta["pos"]
        losses = rest["losses"].tolist()
        first, seconds, resumed_at = meta["step"], meta["seconds"], [*meta["resumed_at"]]
        resumed_at.append(first)
    t_start = time.perf_counter()

    def save(done: int) -> None:
        extra = {
            "center": center,
            "generator": generator.get_state(),
            "order": batches.order,
            "losses": torch.tensor(losses, dtype=torch.float64),
        }
        meta = {
            "step": done,
            "pos": batches.pos,
            "seconds": seconds + time.perf_counter() - t_start,
            "resumed_at": resumed_at,
            "recipe": recipe,
        }
        _save_dino_state(Path(checkpoint), parts, opt, extra, meta)

    model.train()
    bar = tqdm(
        range(first, steps),
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
        initial=first,
        total=steps,
    )
    for step, idx in zip(bar, batches):
        lr = _cosine(step, steps, cfg.lr, cfg.min_lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        # Augmented on the CPU (one random stream on every device), then moved.
        views = [v.to(device) for v in _views(_bases(data, idx, cfg, generator), cfg, generator)]
        with torch.no_grad():
            t_out = [t_head(forward_tokens(t_model, v)) for v in views[:2]]
        feats = [forward_tokens(model, v) for v in views]
        s_out = [head(f) for f in feats]
        sk = cfg.centering == "sinkhorn"
        loss = dino_loss(s_out, t_out, None if sk else center, cfg.student_temp, cfg.teacher_temp)
        if cfg.koleo > 0:  # on the global views' backbone features, as DINOv2
            loss = loss + cfg.koleo * (koleo_loss(feats[0]) + koleo_loss(feats[1])) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < freeze:
            head.last_v.grad = None
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        m = 1 - (1 - cfg.momentum) * (math.cos(math.pi * step / steps) + 1) / 2
        with torch.no_grad():
            for ps, pt in zip(s_params, t_params, strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            batch_center = torch.cat(t_out).mean(0)
            center.mul_(cfg.center_momentum).add_(batch_center, alpha=1 - cfg.center_momentum)
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            # Teacher entropy: ln(out_dim) = uniform collapse, 0 = one-hot collapse.
            with torch.no_grad():
                pt = (
                    sinkhorn_knopp(torch.cat(t_out), cfg.teacher_temp)[: len(t_out[0])]
                    if sk
                    else F.softmax((t_out[0] - center) / cfg.teacher_temp, dim=-1)
                )
                ent = -(pt * pt.clamp_min(1e-12).log()).sum(-1).mean().item()
                used = pt.argmax(-1).unique().numel()
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}", t_ent=f"{ent:.2f}", used=used)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    if stats is not None:
        stats.update(seconds=seconds + time.perf_counter() - t_start, resumed_at=resumed_at)
    model.load_state_dict(t_model.state_dict())  # the teacher is the backbone DINO keeps
    model.eval()
    return losses


def train_supervised(
    model: nn.Module,
    data: ShapesDataset,
    cfg: SupervisedConfig,
    generator: torch.Generator,
    *,
    steps: int | None = None,
    progress: bool = True,
    desc: str = "supervised",
) -> list[float]:
    """End-to-end BCE training (AdamW, one-cycle cosine, random horizontal flips)."""
    steps = cfg.steps if steps is None else steps
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1, anneal_strategy="cos"
    )
    batches = _batches(data, cfg.batch_size, generator)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    device = next(model.parameters()).device
    for _, (x, y) in zip(bar, batches):
        mirrored = torch.rand(len(x), generator=generator) < 0.5
        x[mirrored] = x[mirrored].flip(-1)
        x, y = x.to(device), y.to(device)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    model.eval()
    return losses


def linear_probe(
    model: nn.Module,
    cfg: ProbeConfig,
    generator: torch.Generator,
    *,
    n_train: int | None = None,
    epochs: int | None = None,
    progress: bool = True,
    desc: str = "linear-probe",
) -> list[float]:
    """Freeze ``model``, re-initialise its head and train the head alone (the paper's recipe).

    Adam at ``cfg.lr``, batches of ``cfg.batch_size`` labelled images (seed
    ``cfg.data_seed``), each randomly resized-cropped (``cfg.scale``) and flipped, for
    ``cfg.epochs`` epochs; BCE on the multi-hot labels. The backbone runs in eval mode under
    ``no_grad`` and its parameters keep ``requires_grad=False``.

    Returns:
        The loss of every step.
    """
    n = cfg.n_train if n_train is None else n_train
    epochs = cfg.epochs if epochs is None else epochs
    data = ShapesDataset(n, cfg.data_seed, **FINE)
    device = next(model.parameters()).device
    model.reset_classifier(len(SHAPE_CLASSES))
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_classifier().to(device)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    model.eval()
    losses: list[float] = []
    size = FINE["size"]
    steps_per_epoch = max(1, n // cfg.batch_size)
    bar = tqdm(range(epochs * steps_per_epoch), desc=desc, disable=not progress, dynamic_ncols=True)
    for _, (x, y) in zip(bar, _batches(data, cfg.batch_size, generator)):
        x = random_resized_crop(x, size, cfg.scale, generator).to(device)
        y = y.to(device)
        with torch.no_grad():
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        loss = F.binary_cross_entropy_with_logits(head(feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    return losses


@torch.no_grad()
def heldout_accuracy(model: nn.Module, seed: int = HELDOUT_SEED, n: int = HELDOUT_N) -> float:
    """Exact-set accuracy on ``n`` fresh fine-benchmark images of ``seed``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0.0
    for start in range(0, n, 512):
        b = ShapesDataset(n, seed, **FINE).__getitems__(list(range(start, min(n, start + 512))))
        x = torch.stack([i[0] for i in b]).to(device)
        y = torch.stack([i[1] for i in b])
        correct += set_accuracy(model(x).cpu(), y) * len(b)
    return correct / n


def _tail(losses: list[float]) -> float:
    tail = losses[-50:]
    return round(sum(tail) / len(tail), 5)


def train_entry(
    entry: FineEntry,
    out: Path,
    progress: bool = True,
    cache: Path | None = None,
    *,
    heldout_n: int = HELDOUT_N,
    whiten_images: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train one entry (backbone, then the linear head) and write its checkpoint.

    Args:
        entry: The entry.
        out: Output folder of ``<name>.safetensors`` and ``<name>.json``.
        progress: Show progress bars.
        cache: Folder where the trained backbone is kept (``<name>.backbone.safetensors``,
            with its recipe and training record in the safetensors metadata) and reused on
            a rerun, or None. A reused backbone's record (time, losses, resumptions) goes
            into the new record and its time into ``train_time_s``; one trained with another
            recipe, or without a record, raises ``ValueError``. The head's random streams
            restart from the entry's seed, so a reused backbone gives the same entry as one
            trained in the run. A DINO backbone also keeps its run state there
            (``<name>.dino-state.safetensors``, every 250 steps): an interrupted run
            continues from it when rerun with the same recipe.
        heldout_n: Held-out images (tests use fewer).
        whiten_images: Overrides the stem-whitening image count (tests).
        device: Where the networks train (``"cpu"``, ``"cuda"``); the initialisation and the
            augmentations run on the CPU, so the random stream is the same on every device
            (the results are not bit-identical across devices: kernels differ).

    Returns:
        The verified JSON record.
    """
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    torch.manual_seed(entry.seed)
    record: dict[str, Any] = {
        "name": entry.name,
        **_ARCH,
        "modality": "image",
        "task": "multilabel",
        "classes": list(SHAPE_CLASSES),
        "data": {"generator": "shapes", "kwargs": FINE},
    }
    whiten = _WHITEN if whiten_images is None else dict(_WHITEN, n_images=whiten_images)
    model = new_model(whiten).to(device)
    generator = torch.Generator().manual_seed(entry.seed)
    data = ShapesDataset(TRAIN_N, TRAIN_SEED, **FINE)
    cached = None if cache is None else cache / f"{entry.name}.backbone.safetensors"
    t0 = time.perf_counter()
    stats: dict[str, Any] = {}
    resumed_s = 0.0
    backbone: dict[str, Any] = {
        "name": "backbone",
        "data": {"kwargs": FINE, "seed": TRAIN_SEED, "n_train": TRAIN_N},
        "init": whiten,
    }
    cached_phase: dict[str, Any] = {}
    if cached is not None and cached.is_file():
        cached_phase = _cached_backbone_phase(cached, entry)
        model.load_state_dict(load_file(cached, device=str(device)))
        backbone["cached"] = str(cached.name)
        losses: list[float] = []
    elif entry.backbone == "dino":
        state = None if cache is None else cache / f"{entry.name}.dino-state.safetensors"
        t_dino = time.perf_counter()
        losses = train_dino(
            model, data, entry.dino, generator, progress=progress, checkpoint=state, stats=stats
        )
        # earlier parts of a resumed run count too
        resumed_s = stats["seconds"] - (time.perf_counter() - t_dino)
        if stats["resumed_at"]:
            backbone["resumed_at_steps"] = stats["resumed_at"]
    else:
        losses = train_supervised(model, data, entry.supervised, generator, progress=progress)
    if entry.backbone == "dino":
        backbone.update(
            objective="DINO self-distillation (labels unused)",
            trainable="all (student; the EMA teacher is kept, the DINO head discarded)",
            recipe=asdict(entry.dino),
            optimizer={
                "name": "AdamW",
                "lr": entry.dino.lr,
                "weight_decay": entry.dino.weight_decay,
            },
            schedule="linear warmup, cosine to min_lr; teacher momentum cosine to 1",
            augmentation=(
                (
                    "every view cropped from its own recolouring of the image (new "
                    "background, object colours and noise, layout kept; data.recolour), "
                    if entry.dino.recolour
                    else ""
                )
                + f"2 global crops ({entry.dino.global_size or _VIT['img_size']} px, "
                f"scale {entry.dino.global_scale[0]}.."
                f"{entry.dino.global_scale[1]}) + {entry.dino.n_local} local crops "
                f"({entry.dino.local_size} px, scale {entry.dino.local_scale[0]}.."
                f"{entry.dino.local_scale[1]}), flip, "
                + (
                    "random colour mixing + channel inversion p=0.5"
                    if entry.dino.colour_mix
                    else "channel permutation"
                )
                + ", brightness/contrast 0.6..1.4, "
                "saturation 0.8..1.2, greyscale p=0.2, solarisation p=0.2 (2nd global)"
            ),
        )
    else:
        backbone.update(
            objective="multilabel (sigmoid/BCE), end to end",
            trainable="all (its head then discarded)",
            recipe=asdict(entry.supervised),
            optimizer={
                "name": "AdamW",
                "lr": entry.supervised.lr,
                "weight_decay": entry.supervised.weight_decay,
            },
            schedule={"name": "OneCycleLR", "pct_start": 0.1, "anneal_strategy": "cos"},
            augmentation="random horizontal flip",
        )
    backbone["time_s"] = round(stats.get("seconds", time.perf_counter() - t0), 1)
    if losses:
        backbone["final_loss"] = _tail(losses)
        backbone["first_loss"] = round(losses[0], 5)
    if entry.backbone == "supervised" and not cached_phase:
        backbone["heldout_accuracy_own_head"] = round(heldout_accuracy(model, n=heldout_n), 5)
    if cached_phase:  # the cached backbone's own training, as its run recorded it
        backbone.update(cached_phase)
        resumed_s = cached_phase["time_s"]
    elif cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        kept = {k: backbone[k] for k in _CACHED_PHASE_KEYS if k in backbone}
        meta = {"phase": json.dumps(kept), "recipe": json.dumps(_backbone_recipe(entry))}
        state = {k: v.cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, cached, metadata=meta)

    # The head's randomness does not depend on how the backbone was obtained (trained here or
    # read from the cache): both streams start again from the entry's seed.
    torch.manual_seed(entry.seed + 1)
    t0 = time.perf_counter()
    probe_generator = torch.Generator().manual_seed(entry.seed + 1)
    probe_losses = linear_probe(model, entry.probe, probe_generator, progress=progress)
    probe = {
        "name": "linear-probe",
        "objective": "multilabel (sigmoid/BCE)",
        "trainable": "head only (backbone frozen, head re-initialised)",
        "data": {"kwargs": FINE, "seed": entry.probe.data_seed, "n_train": entry.probe.n_train},
        "epochs": entry.probe.epochs,
        "batch_size": entry.probe.batch_size,
        "optimizer": {"name": "Adam", "lr": entry.probe.lr},
        "schedule": None,
        "augmentation": f"random resized crop (scale {entry.probe.scale[0]}..{entry.probe.scale[1]}, "
        "ratio 3/4..4/3) + random horizontal flip",
        "final_loss": _tail(probe_losses),
        "time_s": round(time.perf_counter() - t0, 1),
    }
    for p in model.parameters():
        p.requires_grad_(False)
    accuracy = heldout_accuracy(model, n=heldout_n)
    seconds = time.perf_counter() - start + resumed_s
    state = {k: v.detach().cpu().contiguous().float() for k, v in model.state_dict().items()}
    import timm

    record.update(
        {
            "params": sum(p.numel() for p in model.parameters()),
            "backbone_frozen": True,
            "backbone_training": entry.backbone,
            "training": {
                "seed": entry.seed,
                "data_seeds": sorted({TRAIN_SEED, entry.probe.data_seed, _WHITEN["data_seed"]}),
                "init": whiten,
                "steps": (entry.dino.steps if entry.backbone == "dino" else entry.supervised.steps)
                + entry.probe.epochs * (entry.probe.n_train // entry.probe.batch_size),
                "phases": [backbone, probe],
                "notes": entry.notes,
            },
            "heldout": {
                "seed": HELDOUT_SEED,
                "n": heldout_n,
                "metric": "set_accuracy",
                "accuracy": round(accuracy, 5),
            },
            "train_time_s": round(seconds, 1),
            "train_threads": torch.get_num_threads(),
            "train_device": torch.device(device).type,
            "command": f"python benchmarks/training/train_dino.py --only {entry.name}",
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
        }
    )
    paths = save_checkpoint(out / entry.name, state, record)
    return verify_checkpoint(paths.record, expect={"name": entry.name})


_CACHED_PHASE_KEYS = (
    "time_s",
    "final_loss",
    "first_loss",
    "resumed_at_steps",
    "heldout_accuracy_own_head",
)


def _backbone_recipe(entry: FineEntry) -> dict[str, Any]:
    """What a cached backbone must have been trained with to stand in for ``entry``'s."""
    recipe = asdict(entry.dino) if entry.backbone == "dino" else asdict(entry.supervised)
    return {"backbone": entry.backbone, "seed": entry.seed, **recipe}


def _cached_backbone_phase(path: Path, entry: FineEntry) -> dict[str, Any]:
    """The training record kept with a cached backbone (time, losses, resumptions).

    Raises:
        ValueError: The file carries no record (written before backbones kept one) or was
            trained with another recipe; one line naming the file.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "phase" not in meta or "recipe" not in meta:
        raise ValueError(
            f"cached backbone {path} carries no training record; delete it to train again"
        )
    _require_recipe(
        json.loads(meta["recipe"]),
        json.loads(json.dumps(_backbone_recipe(entry))),  # tuples as lists, as stored
        f"cached backbone {path} was trained with another recipe",
        "delete it or use another --cache",
    )
    return json.loads(meta["phase"])


def parse_field(kind: type, value: str) -> Any:
    """A ``DINOConfig`` or ``ProbeConfig`` value from its command-line text (``KEY=VALUE``):
    tuples as comma-separated floats, booleans as ``1/0/true/false``."""
    if kind is tuple:
        return tuple(map(float, value.split(",")))
    if kind is bool:
        if value.lower() not in ("1", "0", "true", "false"):
            raise ValueError(f"a boolean field takes 1, 0, true or false, got {value!r}")
        return value.lower() in ("1", "true")
    return kind(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 1 if an entry misses 0.95 held-out accuracy."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(ENTRIES), help="train these entries only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep/reuse trained backbones here; DINO also keeps its run state here every "
        "250 steps and continues from it when rerun with the same recipe",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--dino",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override DINOConfig fields (experiments; the shipped entry uses the defaults)",
    )
    p.add_argument(
        "--probe",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override ProbeConfig fields of every entry trained (experiments; e.g. n_train=4096)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        dino = config_overrides(args.dino, DINOConfig)
        probe = config_overrides(args.probe, ProbeConfig)
    except ValueError as err:
        p.error(str(err))
    failed = []
    for name in args.only or list(ENTRIES):
        base = ENTRIES[name]
        entry = replace(base, dino=replace(base.dino, **dino), probe=replace(base.probe, **probe))
        rec = train_entry(entry, args.out, not args.no_progress, args.cache, device=args.device)
        acc = rec["heldout"]["accuracy"]
        print(
            f"{name}: {rec['params']:,} params, held-out set accuracy {acc:.4f}, "
            f"{rec['train_time_s']:.0f} s, {rec['weights']['bytes'] / 1e6:.2f} MB",
            flush=True,
        )
        if acc < 0.95:
            failed.append(name)
    if failed:
        print(f"below 0.95 held-out accuracy: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
