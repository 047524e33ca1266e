"""ROAD: RemOve And Debias (Rong et al., ICML 2022) with Noisy Linear Imputation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._common import (
    check_batch_size,
    check_finite,
    check_image_inputs,
    check_int,
    check_real,
    check_reals,
    check_score,
    class_scores,
    clean_pass,
    empty_batch,
    forward_logits,
    model_section,
    pick,
    progress,
    ranks_of,
    register_metric,
    resolve_map,
)

__all__ = ["ROAD_TTAME_PERCENTAGES", "noisy_linear_imputation", "road"]

#: Removal percentages used by the T-TAME evaluation (Ntrougkas et al. 2024).
ROAD_TTAME_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
"""Removal fractions of the T-TAME ROAD preset (10 % to 90 % of the pixels)."""

# (dy, dx) -> weight; direct neighbours 1/6, diagonal neighbours 1/12 (sum = 1), as in ROAD.
_NEIGHBOURS: tuple[tuple[int, int, float], ...] = (
    (-1, 0, 1 / 6),
    (1, 0, 1 / 6),
    (0, -1, 1 / 6),
    (0, 1, 1 / 6),
    (-1, -1, 1 / 12),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (1, 1, 1 / 12),
)


def noisy_linear_imputation(
    image: Tensor,
    removed: Tensor,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Noisy Linear Imputation of ROAD (Rong et al. 2022).

    Every removed pixel must equal the weighted mean of its (in-image) 8 neighbours, direct
    neighbours with weight 1/6 and diagonal ones with weight 1/12 (at the image border the
    weights of the missing neighbours are dropped and the rest renormalised). Known pixels are
    fixed. This gives one sparse linear system ``A x = b`` in the removed pixels, shared by all
    channels; it is factorised once and solved for the ``C`` right-hand sides together with
    ``scipy.sparse.linalg.spsolve`` (identical to one solve per channel). Gaussian noise
    ``N(0, noise_std^2)`` is then added to the imputed pixels only.

    Because the weights are symmetric, a function that is linear in ``(y, x)`` equals the
    weighted mean of its full 8-neighbourhood, so removed pixels whose neighbourhoods lie inside
    the image are reconstructed exactly from a linear ramp (with ``noise_std=0``).

    Args:
        image: ``(C, H, W)`` image.
        removed: ``(H, W)`` bool, ``True`` for the pixels to impute.
        noise_std: Standard deviation of the noise added to imputed pixels (ROAD uses 0.01 on
            normalised images), a finite number >= 0; ``0`` disables it.
        generator: Torch generator for the noise (CPU); ``None`` uses the global RNG.

    Returns:
        ``(C, H, W)`` tensor (dtype and device of ``image``); known pixels are unchanged.

    Raises:
        ValueError: On shape mismatches, a non-finite image or ``noise_std``, or when every
            pixel is removed (the system is then singular: nothing anchors the solution).
    """
    from scipy.sparse.linalg import spsolve

    noise_std = check_real(noise_std, "noise_std", 0.0)
    rem = _checked_removal(image, removed)
    check_finite(image, "image", "images")
    c, h, w = image.shape
    rem_np = rem.detach().cpu().numpy().astype(bool).reshape(-1)
    idx = np.flatnonzero(rem_np)
    n = idx.size
    if n == 0:
        return image.clone()
    if n == h * w:
        raise ValueError("cannot impute: every pixel is removed")
    img = image.detach().cpu().double().numpy().reshape(c, -1)
    a, rhs = _imputation_system(img, rem_np, idx, h, w)
    sol = np.asarray(spsolve(a, rhs)).reshape(n, c)
    x = torch.from_numpy(sol)
    if noise_std > 0:
        x = x + noise_std * torch.randn(n, c, generator=generator, dtype=torch.float64)
    out = image.detach().clone().reshape(c, -1)
    idx_t = torch.from_numpy(idx).to(out.device)
    out[:, idx_t] = x.t().to(device=out.device, dtype=out.dtype)
    return out.reshape(c, h, w)


def _checked_removal(image: Tensor, removed: Tensor) -> Tensor:
    """``removed`` as a tensor, its shape checked against ``image (C, H, W)``."""
    if image.dim() != 3:
        raise ValueError(f"image must have shape (C, H, W), got {tuple(image.shape)}")
    _, h, w = image.shape
    rem = torch.as_tensor(removed)
    if tuple(rem.shape) != (h, w):
        raise ValueError(f"removed: expected shape {(h, w)}, got {tuple(rem.shape)}")
    return rem


def _imputation_system(img: np.ndarray, rem_np: np.ndarray, idx: np.ndarray, h: int, w: int):
    """Sparse CSC matrix ``A (n, n)`` and right-hand sides ``b (n, C)`` of the imputation.

    ``img`` is the ``(C, H * W)`` float64 image, ``rem_np`` the flat removal mask and ``idx``
    its ``n`` nonzero positions.
    """
    from scipy.sparse import coo_matrix, diags

    n, c = idx.size, img.shape[0]
    vid = np.full(h * w, -1, dtype=np.int64)
    vid[idx] = np.arange(n)
    ys, xs = np.divmod(idx, w)
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    rows, cols, vals = [], [], []
    eq = np.arange(n)
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diag[valid] += wt
        nidx = np.where(valid, ny * w + nx, 0)
        known = valid & ~rem_np[nidx]
        unknown = valid & rem_np[nidx]
        rhs[known] += wt * img[:, nidx[known]].T
        rows.append(eq[unknown])
        cols.append(vid[nidx[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
    a = coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    return (a + diags(diag)).tocsc(), rhs


@register_metric(
    "road",
    higher_is_better=None,
    category="faithfulness",
    reference="Rong et al., A Consistent and Efficient Evaluation Strategy for Attribution "
    "Methods (ROAD), ICML 2022",
    note="order='morf': lower is better; order='lerf': higher is better",
)
def road(
    model: Callable[..., Any],
    inputs: Tensor,
    attributions: Any,
    target: Any = None,
    order: str = "morf",
    percentages: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    score: str = "top1",
    noise_std: float = 0.01,
    seed: int = 0,
    *,
    attribute_kwargs: dict[str, Any] | None = None,
    batch_size: int | None = None,
    show_progress: bool = False,
) -> Tensor:
    """ROAD scores (Rong et al. 2022) per example and removal percentage.

    For each percentage ``p`` the ``floor(p * H * W)`` most (``order="morf"``) or least
    (``"lerf"``) relevant pixels of the 2-D map (stable sort, ties in raster order) are
    removed from all channels and imputed with :func:`noisy_linear_imputation`; the model is
    re-evaluated on the imputed image.

    Args:
        model: Classifier called as ``model(x)``.
        inputs: Images ``(B, C, H, W)``.
        attributions: Map ``(B, [1|C,] H, W)`` at input resolution or ``Attribution`` object.
        target: Class for ``score != "top1"`` and for the ``Attribution`` path, in
            ``0 .. K - 1``; ``None`` = predicted class.
        order: ``"morf"`` (most relevant first; a faithful map makes the score fall fast, lower
            is better) or ``"lerf"`` (least relevant first; higher is better).
        percentages: Removal fractions: a non-empty sequence of numbers in ``[0, 1)``. T-TAME
            uses :data:`ROAD_TTAME_PERCENTAGES`.
        score: ``"top1"``: 1.0 when the prediction on the imputed image equals the prediction
            on the clean image (the T-TAME preset); ``"softmax"`` / ``"sigmoid"`` /
            ``"logit"``: score of ``target``.
        noise_std: Imputation noise standard deviation, a finite number >= 0.
        seed: Seed of the imputation noise, an integer >= 0 (a private generator; the global
            RNG is untouched).
        attribute_kwargs: Extra keyword arguments for ``.attribute``.
        batch_size: Images per forward pass, an integer >= 1 (``None`` = all imputed images of
            an example).
        show_progress: tqdm progress bar over examples.

    Returns:
        ``(B, len(percentages))`` float64 (``B`` may be 0: an empty batch gives an empty
        result without calling the model).

    Raises:
        TypeError, ValueError: As :func:`~captum_ext.metrics.deletion_auc` (options named in
            the message).
    """
    inputs = check_image_inputs(inputs)
    cfg = _road_settings(order, percentages, score, noise_std, batch_size, show_progress)
    seed = check_int(seed, "seed", 0)
    b, _, h, w = inputs.shape
    clean, tgt = clean_pass(model, inputs, target, cfg.batch_size, "road")
    a = resolve_map(
        attributions, inputs, tgt, attribute_kwargs, batch_size=b, spatial=(h, w), model=model
    )
    ranks = ranks_of(a.flatten(1), descending=(order == "morf"))
    if empty_batch(inputs):
        return torch.zeros(0, len(cfg.percentages), dtype=torch.float64, device=inputs.device)
    # The imputation is a scipy sparse solve on the host: copy images and ranks there once;
    # the model runs and the scores stay on the inputs' device.
    host_inputs, host_ranks = inputs.detach().cpu(), ranks.cpu()
    gen = torch.Generator().manual_seed(seed)
    pred = clean.argmax(dim=1)
    with model_section(model):
        return _road_scores(model, inputs, host_inputs, host_ranks, pred, tgt, gen, cfg)


@dataclass(frozen=True)
class _RoadSettings:
    """Checked settings of :func:`road`."""

    order: str
    percentages: list[float]
    score: str
    noise_std: float
    batch_size: int | None
    show_progress: bool


def _road_settings(
    order: str,
    percentages: Sequence[float],
    score: str,
    noise_std: Any,
    batch_size: Any,
    show_progress: bool,
) -> _RoadSettings:
    """The settings of :func:`road`, checked."""
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    check_score(score, ("top1", "softmax", "sigmoid", "logit"))
    pcts = check_reals(percentages, "percentages", 0.0, 1.0, high_open=True)
    noise_std = check_real(noise_std, "noise_std", 0.0)
    batch_size = check_batch_size(batch_size)
    return _RoadSettings(order, pcts, score, noise_std, batch_size, show_progress)


def _road_scores(
    model: Callable[..., Any],
    inputs: Tensor,
    host_inputs: Tensor,
    host_ranks: Tensor,
    pred: Tensor,
    tgt: Tensor,
    gen: torch.Generator,
    cfg: _RoadSettings,
) -> Tensor:
    """``(B, len(percentages))`` scores of the imputed images, one row per example.

    ``host_inputs`` and ``host_ranks`` are host copies of the inputs and their pixel ranks;
    the model runs on ``inputs.device``.
    """
    b, _, h, w = inputs.shape
    pcts = cfg.percentages
    rows = []
    for i in progress(range(b), cfg.show_progress, desc=f"ROAD {cfg.order}"):
        imgs = []
        for p in pcts:
            removed = (host_ranks[i] < math.floor(p * h * w + 1e-9)).view(h, w)
            imgs.append(noisy_linear_imputation(host_inputs[i], removed, cfg.noise_std, gen))
        logits = forward_logits(model, torch.stack(imgs).to(inputs.device), cfg.batch_size)
        if cfg.score == "top1":
            rows.append((logits.argmax(dim=1) == pred[i]).double())
        else:
            s = class_scores(logits, cfg.score)
            rows.append(pick(s, tgt[i].expand(len(pcts))).double())
    if not rows:
        return torch.empty(0, len(pcts), dtype=torch.float64, device=inputs.device)
    return torch.stack(rows)
