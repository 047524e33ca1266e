"""Sanity checks for explanations (Adebayo et al. 2018)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._common import as_flat, check_int, check_real, progress, register_metric
from .similarity import _pearson_rows, rankdata

__all__ = ["model_randomisation"]

ExplainFn = Callable[[nn.Module, Tensor, Any], Tensor]


def _reinit(module: nn.Module, init_std: float) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    for p in module.parameters(recurse=False):
        nn.init.normal_(p, mean=0.0, std=init_std)


def _similarity(a: Tensor, b: Tensor, kind: str | Callable[[Tensor, Tensor], Tensor]) -> float:
    if callable(kind):
        return float(torch.as_tensor(kind(a, b)).double().nanmean())
    if kind == "spearman":
        r = _pearson_rows(rankdata(a), rankdata(b))
    elif kind == "pearson":
        r = _pearson_rows(a, b)
    else:
        raise ValueError(f"similarity must be 'spearman', 'pearson' or a callable, got {kind!r}")
    return float(r.nanmean())


@register_metric(
    "model_randomisation",
    higher_is_better=False,
    category="sanity",
    reference="Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018",
    note="similarity to the original explanation; a method that passes drops quickly",
)
def model_randomisation(
    model: nn.Module,
    explain_fn: ExplainFn,
    inputs: Tensor,
    target: Any = None,
    *,
    similarity: str | Callable[[Tensor, Tensor], Tensor] = "spearman",
    absolute: bool = False,
    cascading: bool = True,
    init_std: float = 0.02,
    seed: int = 0,
    show_progress: bool = False,
) -> list[tuple[str, float]]:
    """Cascading model-parameter randomisation test (Adebayo et al. 2018).

    The model is deep-copied (the caller's model is never modified) and the copies are put in
    eval mode, so Dropout and BatchNorm of a model left in train mode do not blur the
    comparison. Modules that own
    parameters directly are visited in reverse order of ``model.named_modules()`` (i.e. from
    the output side); each is re-initialised with its ``reset_parameters()`` when it has one,
    otherwise its own parameters are drawn from ``N(0, init_std^2)``. After each step the
    explanation ``explain_fn(model_copy, inputs, target)`` is compared with the one of the
    unmodified copy. With ``cascading=True`` randomisation accumulates (top-down cascade);
    with ``False`` each step randomises only that module of a fresh copy ("independent"
    randomisation).

    A trustworthy explanation method depends on the parameters, so its similarity to the
    original map should drop well below 1 as layers are randomised.

    Args:
        model: The model (left untouched).
        explain_fn: ``explain_fn(model, inputs, target) -> Tensor`` of shape ``(B, ...)``
            (token or image maps; 4-D maps are summed over channels).
        inputs: Inputs passed to ``explain_fn`` (at least one example: the similarities are
            means over examples).
        target: Target passed to ``explain_fn``.
        similarity: ``"spearman"`` (the paper's rank correlation), ``"pearson"`` or a callable
            ``(a, b) -> (B,)`` on flattened ``(B, N)`` float64 maps.
        absolute: Compare absolute values of the maps (the paper reports both variants).
        cascading: Cascading (``True``) or independent (``False``) randomisation.
        init_std: Std of the normal initialisation for modules without ``reset_parameters``,
            a finite number >= 0.
        seed: Seed of the re-initialisation, an integer >= 0 (global RNG state is restored
            afterwards).
        show_progress: tqdm progress bar over modules.

    Returns:
        ``[(module_name, similarity), ...]``, one entry per randomised module, in the order of
        randomisation. ``similarity`` is the mean over examples (NaN examples ignored); the
        unrandomised similarity is 1 by definition and is not listed.

    Raises:
        TypeError, ValueError: ``init_std`` or ``seed`` out of range, an empty batch of
            ``inputs`` or of explanations, NaN / infinite explanations.
    """
    init_std = check_real(init_std, "init_std", 0.0)
    seed = check_int(seed, "seed", 0)
    if isinstance(inputs, Tensor) and inputs.dim() > 0 and inputs.shape[0] == 0:
        raise ValueError(
            f"inputs is an empty batch (shape {tuple(inputs.shape)}); model_randomisation "
            "averages similarities over examples and needs at least one"
        )
    explain = functools.partial(_flat_explanation, explain_fn, inputs, target, absolute)
    base_model = copy.deepcopy(model).eval()
    original = explain(base_model)
    if original.shape[0] == 0:
        raise ValueError(
            "explain_fn returned an empty batch of explanations; model_randomisation averages "
            "similarities over examples and needs at least one"
        )
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        return _randomisation_steps(
            base_model, original, explain, similarity, cascading, init_std, show_progress
        )


def _flat_explanation(
    explain_fn: ExplainFn, inputs: Tensor, target: Any, absolute: bool, m: nn.Module
) -> Tensor:
    """``explain_fn(m, inputs, target)`` flattened to ``(B, N)`` float64 (absolute if asked)."""
    e = as_flat(torch.as_tensor(explain_fn(m, inputs, target)).detach(), name="explain_fn")
    e = e.double()
    return e.abs() if absolute else e


def _randomisation_steps(
    base_model: nn.Module,
    original: Tensor,
    explain: Callable[[nn.Module], Tensor],
    similarity: str | Callable[[Tensor, Tensor], Tensor],
    cascading: bool,
    init_std: float,
    show_progress: bool,
) -> list[tuple[str, float]]:
    """Randomise the parametrised modules of a copy of ``base_model`` from the output side."""
    work = copy.deepcopy(base_model)
    names = [
        name
        for name, mod in work.named_modules()
        if next(iter(mod.parameters(recurse=False)), None) is not None
    ][::-1]
    results: list[tuple[str, float]] = []
    for name in progress(names, show_progress, desc="randomising"):
        if not cascading:
            work = copy.deepcopy(base_model)
        with torch.no_grad():
            _reinit(work.get_submodule(name), init_std)
        sim = _similarity(original, explain(work).to(original.device), similarity)
        results.append((name, sim))
    return results
