"""Perturbation-based faithfulness metrics for image classifiers.

* :func:`deletion_auc` / :func:`insertion_auc` -- RISE causal metrics (Petsiuk et al. 2018),
* :func:`average_drop` / :func:`increase_in_confidence` / :func:`average_drop_ttame` --
  Grad-CAM++ confidence metrics (Chattopadhyay et al. 2018) with the T-TAME preset
  (Ntrougkas et al. 2024),
* :func:`token_perturbation_auc` -- positive / negative patch perturbation (Chefer et al. 2021).

Conventions: ``inputs`` are ``(B, C, H, W)``; attribution maps ``(B, H, W)``,
``(B, 1, H, W)`` or ``(B, C, H, W)`` (summed over channels) at the input resolution, or a Captum
``Attribution`` object (then ``attr.attribute(inputs, target=target, **attribute_kwargs)`` is
used). A pixel's rank comes from the 2-D map and the perturbation is applied to all channels.
``target=None`` means the class the model predicts on the clean input; an explicit target must
lie in ``0 .. K - 1``. The model is called as ``model(inputs)`` under ``torch.no_grad()`` and
may return logits or an object with ``.logits``. An ``nn.Module`` (or a bound method of one) is
run in eval mode under its lock (:func:`captum_ext.capture.model_state`) and restored exactly
afterwards, also when the metric raises: a model left in train mode gives the eval-mode values
and its BatchNorm statistics are not updated. Inputs must be finite; a model returning NaN
scores is refused. An empty batch (``B = 0``) gives an empty result without calling the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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
    resolve_attributions,
    resolve_map,
    trapezoid,
)

__all__ = [
    "TTAME_KEEP",
    "average_drop",
    "average_drop_ttame",
    "deletion_auc",
    "gaussian_blur",
    "increase_in_confidence",
    "insertion_auc",
    "token_perturbation_auc",
]

Model = Callable[..., Any]


# ----------------------------------------------------------------------------------------------
# RISE deletion / insertion
# ----------------------------------------------------------------------------------------------


def gaussian_blur(x: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images with replicate padding.

    The defaults (11 px, sigma 5) are the RISE insertion substrate.

    Raises:
        TypeError, ValueError: ``kernel_size`` is not a positive odd integer or ``sigma`` not a
            finite number > 0.
    """
    kernel_size = check_int(kernel_size, "kernel_size", 1, odd=True)
    sigma = check_real(sigma, "sigma", 0.0, low_open=True)
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _substrate(inputs: Tensor, substrate: str | Tensor, blur_kernel: int, blur_sigma: float):
    if isinstance(substrate, Tensor):
        check_finite(substrate, "substrate", "substrates")
        try:
            return substrate.to(inputs).expand_as(inputs)
        except RuntimeError:
            raise ValueError(
                f"substrate of shape {tuple(substrate.shape)} does not broadcast to the inputs "
                f"{tuple(inputs.shape)}"
            ) from None
    if substrate == "zero":
        return torch.zeros_like(inputs)
    if substrate == "blur":
        return gaussian_blur(inputs, blur_kernel, blur_sigma)
    if substrate == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    raise ValueError(f"substrate must be 'zero', 'blur', 'mean' or a Tensor, got {substrate!r}")


@dataclass(frozen=True)
class _CurveSettings:
    """Settings of a RISE deletion or insertion curve, as given to the public metric."""

    steps: int
    substrate: str | Tensor
    score: str
    batch_size: int | None
    blur_kernel_size: int
    blur_sigma: float
    attribute_kwargs: dict[str, Any] | None
    show_progress: bool
    return_curve: bool


def _curve_settings(
    steps: Any,
    substrate: str | Tensor,
    score: str,
    batch_size: Any,
    blur_kernel_size: Any,
    blur_sigma: Any,
    attribute_kwargs: dict[str, Any] | None,
    show_progress: bool,
    return_curve: bool,
) -> _CurveSettings:
    """The arguments of :func:`deletion_auc` / :func:`insertion_auc`, checked."""
    if not isinstance(substrate, Tensor) and substrate not in ("zero", "blur", "mean"):
        raise ValueError(f"substrate must be 'zero', 'blur', 'mean' or a Tensor, got {substrate!r}")
    check_score(score, ("softmax", "sigmoid", "logit"))
    return _CurveSettings(
        check_int(steps, "steps", 1),
        substrate,
        score,
        check_batch_size(batch_size),
        check_int(blur_kernel_size, "blur_kernel_size", 1, odd=True),
        check_real(blur_sigma, "blur_sigma", 0.0, low_open=True),
        attribute_kwargs,
        show_progress,
        return_curve,
    )


def _curve_x(steps: int, hw: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixels taken at each step ``(steps + 1,)`` and the curve's x positions (their share)."""
    n = torch.tensor([(k * hw) // steps for k in range(steps + 1)], device=device)
    return n, n.double() / hw


@torch.no_grad()
def _causal_curve(
    model: Model,
    start: Tensor,
    finish: Tensor,
    ranks: Tensor,
    target: Tensor,
    cfg: _CurveSettings,
    desc: str,
) -> tuple[Tensor, Tensor]:
    """Scores ``(B, steps + 1)`` and x positions ``(steps + 1,)`` of a RISE curve.

    At step ``k`` the ``n_k = floor(k * HW / steps)`` pixels of lowest rank are taken from
    ``finish``, the others from ``start``.
    """
    steps = cfg.steps
    b, _, h, w = start.shape
    hw = h * w
    n, x = _curve_x(steps, hw, start.device)
    batch_size = cfg.batch_size or b * (steps + 1)
    pairs_b = torch.arange(b, device=start.device).repeat_interleave(steps + 1)
    pairs_k = torch.arange(steps + 1, device=start.device).repeat(b)
    out = torch.empty(b * (steps + 1), dtype=torch.float64, device=start.device)
    chunks = range(0, pairs_b.numel(), batch_size)
    for i in progress(chunks, cfg.show_progress, desc=desc, total=len(chunks)):
        bi = pairs_b[i : i + batch_size]
        ki = pairs_k[i : i + batch_size]
        sel = (ranks[bi] < n[ki].view(-1, 1)).view(-1, 1, h, w)
        imgs = torch.where(sel, finish[bi], start[bi])
        s = class_scores(forward_logits(model, imgs), cfg.score)
        out[i : i + batch_size] = pick(s, target[bi]).double()
    return out.view(b, steps + 1), x


def _rise(
    kind: str,
    model: Model,
    inputs: Tensor,
    attributions: Any,
    target: Any,
    cfg: _CurveSettings,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """AUC (and curve) of the RISE ``kind`` (``"deletion"`` or ``"insertion"``) metric."""
    inputs = check_image_inputs(inputs)
    b, _, h, w = inputs.shape
    _, tgt = clean_pass(model, inputs, target, cfg.batch_size, f"{kind}_auc")
    a = resolve_map(
        attributions, inputs, tgt, cfg.attribute_kwargs, batch_size=b, spatial=(h, w), model=model
    ).to(inputs.device)
    ranks = ranks_of(a.flatten(1), descending=True)
    sub = _substrate(inputs, cfg.substrate, cfg.blur_kernel_size, cfg.blur_sigma)
    start, finish = (inputs, sub) if kind == "deletion" else (sub, inputs)
    if empty_batch(inputs):
        x = _curve_x(cfg.steps, h * w, inputs.device)[1]
        curve = torch.zeros(0, cfg.steps + 1, dtype=torch.float64, device=inputs.device)
    else:
        with model_section(model):
            curve, x = _causal_curve(model, start, finish, ranks, tgt, cfg, kind)
    auc = trapezoid(curve, x)
    return (auc, curve, x) if cfg.return_curve else auc


@register_metric(
    "deletion_auc",
    higher_is_better=False,
    category="faithfulness",
    reference="Petsiuk et al., RISE: Randomized Input Sampling for Explanation of Black-box "
    "Models, BMVC 2018",
)
def deletion_auc(
    model: Model,
    inputs: Tensor,
    attributions: Any,
    target: Any = None,
    steps: int = 100,
    substrate: str | Tensor = "zero",
    score: str = "softmax",
    batch_size: int | None = 64,
    *,
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    attribute_kwargs: dict[str, Any] | None = None,
    show_progress: bool = False,
    return_curve: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """RISE deletion metric (Petsiuk et al. 2018): area under the deletion curve.

    Starting from the input, the most relevant pixels (stable descending sort of the 2-D map;
    ties in raster order) are replaced by the substrate, ``floor(k * H * W / steps)`` pixels at
    step ``k = 0..steps``. The score of ``target`` is recorded at every step and integrated with
    the trapezoid rule over the removed fraction in ``[0, 1]``. Lower is better.

    Args:
        model: Classifier called as ``model(x)``.
        inputs: Images ``(B, C, H, W)``.
        attributions: Map ``(B, [1|C,] H, W)`` or a Captum ``Attribution`` object.
        target: Class index (int or ``(B,)``) in ``0 .. K - 1``; ``None`` = predicted class.
        steps: Number of perturbation steps, an integer >= 1 (``steps + 1`` forward passes per
            image).
        substrate: What removed pixels become: ``"zero"`` (RISE deletion default), ``"blur"``
            (Gaussian blur of the input), ``"mean"`` (per-image channel mean) or a tensor
            finite tensor broadcastable to ``inputs``.
        score: ``"softmax"``, ``"sigmoid"`` (multi-label models) or ``"logit"``.
        batch_size: Perturbed images per forward pass, an integer >= 1 (``None`` = all).
        blur_kernel_size: Kernel size of the ``"blur"`` substrate, a positive odd integer.
        blur_sigma: Standard deviation of the ``"blur"`` substrate, a finite number > 0.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.
        show_progress: Show a tqdm progress bar over forward passes.
        return_curve: Also return the curve ``(B, steps + 1)`` and its x positions
            ``(steps + 1,)``.

    Returns:
        ``(B,)`` float64 AUC, or ``(auc, curve, x)`` when ``return_curve``; for an empty batch
        ``(0,)`` (and a ``(0, steps + 1)`` curve).

    Raises:
        TypeError, ValueError: An option of the wrong type or out of its range (named in the
            message), inputs that are not finite ``(B, C, H, W)``, maps of another shape or with
            NaN / infinite values, a target outside ``0 .. K - 1``, NaN model scores.
    """
    cfg = _curve_settings(
        steps,
        substrate,
        score,
        batch_size,
        blur_kernel_size,
        blur_sigma,
        attribute_kwargs,
        show_progress,
        return_curve,
    )
    return _rise("deletion", model, inputs, attributions, target, cfg)


@register_metric(
    "insertion_auc",
    higher_is_better=True,
    category="faithfulness",
    reference="Petsiuk et al., RISE, BMVC 2018",
)
def insertion_auc(
    model: Model,
    inputs: Tensor,
    attributions: Any,
    target: Any = None,
    steps: int = 100,
    substrate: str | Tensor = "blur",
    score: str = "softmax",
    batch_size: int | None = 64,
    *,
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    attribute_kwargs: dict[str, Any] | None = None,
    show_progress: bool = False,
    return_curve: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """RISE insertion metric (Petsiuk et al. 2018): area under the insertion curve.

    Starting from the substrate (a blurred copy of the input by default), the most relevant
    pixels of the input are inserted first. Higher is better. Arguments as in
    :func:`deletion_auc`, except that ``substrate`` defaults to ``"blur"``.

    Returns:
        ``(B,)`` float64 AUC, or ``(auc, curve, x)`` when ``return_curve``; for an empty batch
        ``(0,)`` (and a ``(0, steps + 1)`` curve).

    Raises:
        TypeError, ValueError: An option of the wrong type or out of its range (named in the
            message), inputs that are not finite ``(B, C, H, W)``, maps of another shape or with
            NaN / infinite values, a target outside ``0 .. K - 1``, NaN model scores.
    """
    cfg = _curve_settings(
        steps,
        substrate,
        score,
        batch_size,
        blur_kernel_size,
        blur_sigma,
        attribute_kwargs,
        show_progress,
        return_curve,
    )
    return _rise("insertion", model, inputs, attributions, target, cfg)


# ----------------------------------------------------------------------------------------------
# Average drop / increase in confidence
# ----------------------------------------------------------------------------------------------


def _normalise(a: Tensor, mode: str) -> Tensor:
    """Per-example normalisation of ``(B, H, W)`` maps to ``[0, 1]``."""
    if mode == "minmax":
        lo = a.amin(dim=(1, 2), keepdim=True)
        span = a.amax(dim=(1, 2), keepdim=True) - lo
        return torch.where(span > 0, (a - lo) / span.clamp(min=torch.finfo(a.dtype).tiny), 0.0)
    if mode == "max":
        a = a.clamp(min=0)
        mx = a.amax(dim=(1, 2), keepdim=True)
        return torch.where(mx > 0, a / mx.clamp(min=torch.finfo(a.dtype).tiny), 0.0)
    if mode == "none":
        return a
    raise ValueError(f"normalise must be 'minmax', 'max' or 'none', got {mode!r}")


def _row_quantile(x: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile of ``x`` (B, N) with linear interpolation (as ``torch.quantile``,
    without its input-size limit)."""
    s = torch.sort(x, dim=1).values
    pos = q * (x.shape[1] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[:, lo] + (s[:, hi] - s[:, lo]) * (pos - lo)


def _explanation_mask(a01: Tensor, keep: float, mask_mode: str) -> Tensor:
    flat = a01.reshape(a01.shape[0], -1)
    thr = _row_quantile(flat, 1.0 - keep)
    kept = a01 >= thr.view(-1, 1, 1)
    if mask_mode == "binary":
        return kept.to(a01.dtype)
    return a01 * kept


@dataclass(frozen=True)
class _Masking:
    """How the explanation masks the input and how the masked input is scored."""

    keep: float
    mask_mode: str
    score: str
    batch_size: int | None


def _masking(keep: Any, mask_mode: str, score: str, batch_size: Any) -> _Masking:
    """The masking options of :func:`average_drop` and its relatives, checked."""
    if mask_mode not in ("soft", "binary"):
        raise ValueError(f"mask_mode must be 'soft' or 'binary', got {mask_mode!r}")
    check_score(score, ("softmax", "sigmoid", "logit"))
    keep = check_real(keep, "keep", 0.0, 1.0, low_open=True)
    return _Masking(keep, mask_mode, score, check_batch_size(batch_size))


@torch.no_grad()
def _confidences(
    model: Model,
    inputs: Tensor,
    a01: Tensor,
    tgt: Tensor,
    clean: Tensor,
    masking: _Masking,
) -> tuple[Tensor, Tensor]:
    """``(Y, O)``: clean and masked-input scores of ``tgt``, both ``(B,)`` float64."""
    m = _explanation_mask(a01, masking.keep, masking.mask_mode)
    masked = inputs * m.unsqueeze(1).to(inputs.dtype)
    score = masking.score
    y = pick(class_scores(clean, score), tgt).double()
    o = pick(class_scores(forward_logits(model, masked, masking.batch_size), score), tgt).double()
    return y, o


def _prepare_ad(
    model: Model,
    inputs: Tensor,
    attributions: Any,
    target: Any,
    normalise: str,
    attribute_kwargs: dict[str, Any] | None,
    batch_size: int | None,
    method: str,
) -> tuple[Tensor, Tensor, Tensor]:
    inputs = check_image_inputs(inputs)
    if normalise not in ("minmax", "max", "none"):
        raise ValueError(f"normalise must be 'minmax', 'max' or 'none', got {normalise!r}")
    b, _, h, w = inputs.shape
    clean, tgt = clean_pass(model, inputs, target, batch_size, method)
    a = resolve_map(
        attributions, inputs, tgt, attribute_kwargs, batch_size=b, spatial=(h, w), model=model
    ).to(inputs.device)
    return clean, tgt, _normalise(a.to(inputs.dtype), normalise)


def _scores_ad(
    model: Model, inputs: Tensor, a01: Tensor, tgt: Tensor, clean: Tensor, masking: _Masking
) -> tuple[Tensor, Tensor]:
    """:func:`_confidences` in a model section; empty scores for an empty batch."""
    if empty_batch(inputs):
        empty = torch.zeros(0, dtype=torch.float64, device=inputs.device)
        return empty, empty
    with model_section(model):
        return _confidences(model, inputs, a01, tgt, clean, masking)


def _ad(y: Tensor, o: Tensor, percent: bool) -> Tensor:
    ad = (y - o).clamp(min=0) / y
    ad = ad.masked_fill(y <= 0, float("nan"))
    return ad * 100 if percent else ad


def _ic(y: Tensor, o: Tensor, percent: bool) -> Tensor:
    ic = (o > y).double()
    return ic * 100 if percent else ic


@register_metric(
    "average_drop",
    higher_is_better=False,
    category="faithfulness",
    reference="Chattopadhyay et al., Grad-CAM++, WACV 2018",
)
def average_drop(
    model: Model,
    inputs: Tensor,
    attributions: Any,
    target: Any = None,
    keep: float = 1.0,
    mask_mode: str = "soft",
    normalise: str = "minmax",
    score: str = "softmax",
    percent: bool = True,
    *,
    attribute_kwargs: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Per-example drop in confidence when only the explained region is shown (Grad-CAM++).

    The map is normalised to ``[0, 1]`` per example (``normalise``), values below the
    ``(1 - keep)`` quantile of the map are set to 0 (values equal to the threshold are kept,
    as in the T-TAME code), and the model sees ``inputs * mask`` (``mask_mode="soft"``: the
    thresholded map itself; ``"binary"``: 1 on the kept pixels). With ``Y`` the clean score and
    ``O`` the score on the masked image (both for ``target``)::

        AD_i = max(0, Y_i - O_i) / Y_i      (x 100 when percent=True)

    The paper's Average Drop % is ``average_drop(...).nanmean()``.

    Args:
        model: Classifier called as ``model(x)``.
        inputs: Images ``(B, C, H, W)``.
        attributions: Map ``(B, [1|C,] H, W)`` at input resolution or ``Attribution`` object.
        target: Class index (int or ``(B,)``) in ``0 .. K - 1``; ``None`` = predicted class.
        keep: Fraction of the map kept, a finite number in ``(0, 1]`` (T-TAME uses 1.0, 0.5
            and 0.15).
        mask_mode: ``"soft"`` (multiply by the map) or ``"binary"`` (multiply by 0/1).
        normalise: ``"minmax"`` (``(s - min) / (max - min)``; a constant map becomes all zeros),
            ``"max"`` (``relu(s) / max``; all zeros if max <= 0) or ``"none"`` (map already in
            ``[0, 1]``).
        score: ``"softmax"``, ``"sigmoid"`` or ``"logit"``; AD needs positive scores, so
            examples with ``Y <= 0`` give ``NaN``.
        percent: Multiply by 100.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.
        batch_size: Images per forward pass, an integer >= 1 (``None`` = all at once).

    Returns:
        ``(B,)`` float64 (``(0,)`` for an empty batch).

    Raises:
        TypeError, ValueError: As :func:`deletion_auc` (options named in the message).
    """
    masking = _masking(keep, mask_mode, score, batch_size)
    clean, tgt, a01 = _prepare_ad(
        model,
        inputs,
        attributions,
        target,
        normalise,
        attribute_kwargs,
        masking.batch_size,
        "average_drop",
    )
    y, o = _scores_ad(model, inputs, a01, tgt, clean, masking)
    return _ad(y, o, percent)


@register_metric(
    "increase_in_confidence",
    higher_is_better=True,
    category="faithfulness",
    reference="Chattopadhyay et al., Grad-CAM++, WACV 2018",
)
def increase_in_confidence(
    model: Model,
    inputs: Tensor,
    attributions: Any,
    target: Any = None,
    keep: float = 1.0,
    mask_mode: str = "soft",
    normalise: str = "minmax",
    score: str = "softmax",
    percent: bool = False,
    *,
    attribute_kwargs: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Per-example increase in confidence (Grad-CAM++): ``1.0`` if ``O > Y`` else ``0.0``.

    Same masking as :func:`average_drop`; the paper's "Increase in Confidence %" is
    ``100 * increase_in_confidence(...).mean()`` (or ``percent=True``, which returns 100/0).

    Returns:
        ``(B,)`` float64.
    """
    masking = _masking(keep, mask_mode, score, batch_size)
    clean, tgt, a01 = _prepare_ad(
        model,
        inputs,
        attributions,
        target,
        normalise,
        attribute_kwargs,
        masking.batch_size,
        "increase_in_confidence",
    )
    y, o = _scores_ad(model, inputs, a01, tgt, clean, masking)
    return _ic(y, o, percent)


TTAME_KEEP: tuple[float, ...] = (1.0, 0.5, 0.15)
"""Fractions of the map kept at the three T-TAME operating points (100, 50 and 15 %)."""


@register_metric(
    "average_drop_ttame",
    higher_is_better=None,
    category="faithfulness",
    reference="Ntrougkas et al., T-TAME: Trainable Attention Mechanism for Explaining "
    "Convolutional Networks and Vision Transformers, IEEE Access 2024",
    note="dict of AD (lower is better) and IC (higher is better) at 100/50/15 %",
)
def average_drop_ttame(
    model: Model,
    inputs: Tensor,
    attributions: Any,
    target: Any = None,
    *,
    score: str = "softmax",
    attribute_kwargs: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """AD and IC at the three T-TAME operating points (Ntrougkas et al. 2024).

    Min-max normalised soft masks keeping 100 %, 50 % and 15 % of the map; target defaults to
    the predicted class. Attributions and the clean forward pass are computed once.

    Returns:
        ``{"AD100", "IC100", "AD50", "IC50", "AD15", "IC15"}``, each ``(B,)`` float64 **in
        percent** (IC entries are 100 or 0), so ``.mean()`` gives the numbers in the paper's
        tables.
    """
    maskings = [_masking(keep, "soft", score, batch_size) for keep in TTAME_KEEP]
    clean, tgt, a01 = _prepare_ad(
        model,
        inputs,
        attributions,
        target,
        "minmax",
        attribute_kwargs,
        maskings[0].batch_size,
        "average_drop_ttame",
    )
    out: dict[str, Tensor] = {}
    for keep, masking in zip(TTAME_KEEP, maskings, strict=True):
        y, o = _scores_ad(model, inputs, a01, tgt, clean, masking)
        tag = round(keep * 100)
        out[f"AD{tag}"] = _ad(y, o, True)
        out[f"IC{tag}"] = _ic(y, o, True)
    return out


# ----------------------------------------------------------------------------------------------
# Positive / negative token (patch) perturbation
# ----------------------------------------------------------------------------------------------


def _patch_scores(
    model: Model,
    token_scores: Any,
    inputs: Tensor,
    tgt: Tensor,
    attribute_kwargs: dict[str, Any] | None,
    patch_size: int,
) -> Tensor:
    b, _, h, w = inputs.shape
    gh, gw = h // patch_size, w // patch_size
    s = resolve_attributions(
        token_scores, inputs, tgt, attribute_kwargs, name="token_scores", model=model
    )
    if s.dim() == 2:
        if s.shape != (b, gh * gw):
            raise ValueError(
                f"token_scores: expected shape ({b}, {gh * gw}) (one score per "
                f"{patch_size}x{patch_size} patch in row-major order), got {tuple(s.shape)}"
            )
        s = s.float() if not s.is_floating_point() else s
        check_finite(s, "token_scores")
        return s.to(inputs.device)
    # pixel maps are sum-pooled onto the patch grid
    a = resolve_map(s, None, None, None, name="token_scores", batch_size=b, spatial=(h, w))
    pooled = F.avg_pool2d(a[:, None, : gh * patch_size, : gw * patch_size], patch_size)
    return (pooled * patch_size**2).flatten(1).to(inputs.device)


@dataclass(frozen=True)
class _PerturbationSettings:
    """Checked settings of a positive / negative patch perturbation curve."""

    mode: str
    fractions: list[float]
    patch_size: int
    score: str
    batch_size: int | None


def _perturbation_settings(
    inputs: Tensor,
    mode: str,
    fractions: Sequence[float],
    patch_size: Any,
    score: str,
    batch_size: Any,
) -> _PerturbationSettings:
    """The settings of :func:`token_perturbation_auc`, checked against ``inputs``."""
    if mode not in ("positive", "negative"):
        raise ValueError(f"mode must be 'positive' or 'negative', got {mode!r}")
    check_score(score, ("top1", "softmax", "sigmoid", "logit"))
    fr = check_reals(fractions, "fractions", 0.0, 1.0, low_open=True, increasing=True)
    patch_size = check_int(patch_size, "patch_size", 1)
    batch_size = check_batch_size(batch_size)
    _, _, h, w = inputs.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {(h, w)} is not a multiple of patch_size={patch_size}")
    return _PerturbationSettings(mode, fr, patch_size, score, batch_size)


def _perturbation_curve(
    model: Model,
    inputs: Tensor,
    clean: Tensor,
    tgt: Tensor,
    ranks: Tensor,
    cfg: _PerturbationSettings,
    show_progress: bool,
) -> Tensor:
    """Scores ``(B, 1 + len(fractions))`` of the clean and the patch-perturbed images."""
    b, _, h, w = inputs.shape
    ps = cfg.patch_size
    gh, gw = h // ps, w // ps
    pred = clean.argmax(dim=1)

    def _score(logits: Tensor) -> Tensor:
        if cfg.score == "top1":
            return (logits.argmax(dim=1) == pred).double()
        return pick(class_scores(logits, cfg.score), tgt).double()

    cols = [_score(clean)]
    p = gh * gw
    for f in progress(cfg.fractions, show_progress, desc=f"{cfg.mode} perturbation"):
        k = math.floor(f * p + 1e-9)
        drop = (ranks < k).view(b, 1, gh, gw)
        drop = drop.repeat_interleave(ps, 2).repeat_interleave(ps, 3)
        cols.append(_score(forward_logits(model, inputs.masked_fill(drop, 0), cfg.batch_size)))
    return torch.stack(cols, dim=1)


@register_metric(
    "token_perturbation_auc",
    higher_is_better=None,
    category="faithfulness",
    reference="Chefer et al., Transformer Interpretability Beyond Attention Visualization, "
    "CVPR 2021",
    note="mode='positive': lower is better; mode='negative': higher is better",
)
def token_perturbation_auc(
    model: Model,
    inputs: Tensor,
    token_scores: Any,
    target: Any = None,
    mode: str = "positive",
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    patch_size: int = 16,
    score: str = "top1",
    *,
    attribute_kwargs: dict[str, Any] | None = None,
    batch_size: int | None = None,
    show_progress: bool = False,
    return_curve: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Positive / negative perturbation AUC of patch-token scores (Chefer et al. 2021).

    The image is divided into ``patch_size x patch_size`` cells (``P = (H // ps) * (W // ps)``
    tokens in row-major order). For every fraction ``f`` the ``floor(f * P)`` cells with the
    highest (``mode="positive"``) or lowest (``mode="negative"``) token score are set to zero
    (stable sort, ties in row-major order) and the model is re-evaluated. The curve includes
    ``f = 0`` (the clean image) and is integrated with the trapezoid rule over
    ``(0, *fractions)`` (so over ``[0, 0.9]`` with the defaults, as in the paper).

    Args:
        model: Classifier called as ``model(x)``.
        inputs: Images ``(B, C, H, W)``.
        token_scores: ``(B, P)`` patch scores (no CLS token), or a pixel map / ``Attribution``
            object whose ``(B, H, W)`` map is sum-pooled onto the patch grid.
        target: Class for ``score="softmax"`` and for the ``Attribution`` path, in
            ``0 .. K - 1``; ``None`` = predicted class.
        mode: ``"positive"`` (remove most relevant first; lower AUC is better) or
            ``"negative"`` (least relevant first; higher is better).
        fractions: Removed fractions: a non-empty increasing sequence of numbers in ``(0, 1]``.
        patch_size: Side of a patch in pixels, an integer >= 1 dividing ``H`` and ``W``.
        score: ``"top1"`` (1.0 when the perturbed prediction equals the clean predicted class,
            i.e. the paper's top-1 accuracy w.r.t. the model's own prediction), or
            ``"softmax"`` / ``"sigmoid"`` / ``"logit"`` score of ``target``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.
        batch_size: Images per forward pass.
        show_progress: tqdm progress bar over fractions.
        return_curve: Also return the curve ``(B, 1 + len(fractions))`` and its x positions.

    Returns:
        ``(B,)`` float64 AUC, or ``(auc, curve, x)`` when ``return_curve`` (``B`` may be 0).

    Raises:
        TypeError, ValueError: As :func:`deletion_auc` (options named in the message).
    """
    inputs = check_image_inputs(inputs)
    cfg = _perturbation_settings(inputs, mode, fractions, patch_size, score, batch_size)
    clean, tgt = clean_pass(model, inputs, target, cfg.batch_size, "token_perturbation_auc")
    s = _patch_scores(model, token_scores, inputs, tgt, attribute_kwargs, cfg.patch_size)
    ranks = ranks_of(s, descending=(mode == "positive"))
    if empty_batch(inputs):
        curve = torch.zeros(0, 1 + len(cfg.fractions), dtype=torch.float64, device=inputs.device)
    else:
        with model_section(model):
            curve = _perturbation_curve(model, inputs, clean, tgt, ranks, cfg, show_progress)
    x = torch.tensor([0.0, *cfg.fractions], dtype=torch.float64, device=curve.device)
    auc = trapezoid(curve, x)
    return (auc, curve, x) if return_curve else auc
