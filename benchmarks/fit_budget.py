"""How T-TAME's and MHEX's maps depend on the fitting budget (images x optimiser steps).

    python benchmarks/fit_budget.py            # the committed run (~20 min, one CPU thread)
    python benchmarks/fit_budget.py --quick    # a smoke run (writes fit_budget_quick.*)
    python benchmarks/fit_budget.py --from-json benchmarks/results/fit_budget.json  # re-render

Part A, map quality against ground truth. :class:`captum_ext.TTAME` and
:class:`captum_ext.MHEX` are fitted to the zoo's trained ``shapes-cnn`` and ``shapes-vit``
on the first ``N`` images of a fixed training pool (the zoo entries' own data seeds and
learning rates, ``benchmarks/training/train_ttame.py`` / ``train_mhex.py``), for a grid of
``N`` (distinct images) and optimiser steps at one batch size; a budget ``(N, steps)`` is
run only where the steps cover every image at least once (``steps * batch >= N``): epochs =
``round(steps / ceil(N / batch))``, and the steps actually taken are recorded. Each fit is
scored on fresh two-object images (seed 515151, never trained on) with every present class
explained separately (as ``train_mhex.py::image_metrics`` pairs them):

* **pointing game** at the standard protocol (Zhang et al.: 15 px at 224 px, 2 px at the
  data's 32 px; :func:`captum_ext.metrics.pointing_game` with ``tolerance="standard"``) on
  the ``attribute`` output at input resolution against the object's pixels, with a 95 %
  percentile bootstrap interval resampling whole images
  (:func:`captum_ext.evaluation._bootstrap.bootstrap_ci`);
* **uniformity** (:func:`uniformity`): the normalised entropy of the map read as a
  distribution after min-max normalisation, 1 for a constant map, about 0.9 for a map of
  independent uniform noise, ``log(k) / log(HW)`` for a map that is 1 on ``k`` pixels and 0
  elsewhere;
* **area** (:func:`area`): the mean of the min-max normalised map (1 = flat at its maximum;
  ``max / mean`` of the normalised map is ``1 / area``);
* **object mass** (:func:`object_mass`): the share of the normalised map's mass on the object's
  pixels (a flat map scores the object's share of the image).

The same numbers for GradCAM (``captum_ext.references.GradCAM``, ``layer4``) on the CNN and
TAM (:class:`captum_ext.TAM`) on the ViT, which need no training, for the zoo's fitted
entries (the full recipe), and for a constant map (chance).

Part B, cost and stability on an ImageNet-size network: timm ``resnet50`` with 1000 classes,
**randomly initialised** (``torch.manual_seed(0)``; no pretrained weights are available
offline), eval mode, 224 x 224 inputs (procedural shapes images of 56 px, ``layout="free"``,
upsampled bilinearly). MHEX's labels are the plain model's own top-1 classes (T-TAME takes
the model's predictions itself). For each budget ``(N, epochs)`` at batch 8, one thread:
seconds per optimiser step (the fit's wall time over its steps), the process's peak resident
memory during the fit (``VmHWM``, reset before each fit where Linux allows), the uniformity of
the maps of 8 held-out images, the Pearson correlation of those maps with the largest
budget's, and MHEX's agreement: the share of fitted and of held-out images whose top-1 from
``mhex.network`` equals the plain model's. A random network localises nothing, so part B
measures cost, agreement and stability only. ``--threads-b 1 2`` also times 2 threads.

Writes ``benchmarks/results/fit_budget.json``, ``.md`` and ``.png`` (``fit_budget_quick.*``
with ``--quick``). The reading of these numbers: ``docs/fitting.md``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "training"))
sys.path.insert(0, str(HERE))

from _suite_measure import _hwm_bytes, _reset_hwm  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from captum_ext import MHEX, TAM, TTAME, TrainingRecipe, zoo  # noqa: E402
from captum_ext.data import shapes  # noqa: E402
from captum_ext.evaluation._bootstrap import bootstrap_ci  # noqa: E402
from captum_ext.evaluation._maps import model_patch, to_pixels_bilinear  # noqa: E402
from captum_ext.metrics import pointing_game  # noqa: E402
from captum_ext.references import GradCAM  # noqa: E402

__all__ = [
    "FitSpec",
    "area",
    "budget_epochs",
    "main",
    "object_mass",
    "part_a",
    "part_b",
    "pearson",
    "score_maps",
    "uniformity",
]

RESULTS = HERE / "results"
EVAL_SEED = 515151
B_SEED = 727272
MODELS = ("shapes-cnn", "shapes-vit")
METHODS = ("ttame", "mhex")


# --------------------------------------------------------------------------------------------
# map statistics


def _flat_normalised(maps: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` float64 maps min-max normalised per map (constant maps: all zero)."""
    m = maps.detach().double().flatten(1)
    m = m - m.amin(1, keepdim=True)
    top = m.amax(1, keepdim=True)
    return torch.where(top > 0, m / top.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def uniformity(maps: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of each map, ``(B,)`` float64 in ``[0, 1]``.

    The map ``(B, [1,] H, W)`` is min-max normalised, read as a distribution
    ``p = m / sum(m)`` over its ``n = H * W`` pixels, and ``-sum p log p / log n`` is returned:
    1 for a constant map (defined so: every pixel is equally high), ``log(k) / log(n)`` for a
    map that is 1 on ``k`` pixels and 0 elsewhere. Maps with ``n = 1`` give 1.
    """
    m = _flat_normalised(maps)
    n = m.shape[1]
    if n == 1:
        return torch.ones(m.shape[0], dtype=torch.float64)
    total = m.sum(1, keepdim=True)
    p = m / total.clamp_min(torch.finfo(torch.float64).tiny)
    h = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0).sum(1) / math.log(n)
    return torch.where(total[:, 0] > 0, h, 1.0).clamp(0.0, 1.0)


def area(maps: torch.Tensor) -> torch.Tensor:
    """Mean of each min-max normalised map, ``(B,)`` float64 (a constant map: 1)."""
    m = _flat_normalised(maps)
    flat = maps.detach().flatten(1)
    constant = (flat == flat[:, :1]).all(1)
    return torch.where(constant, 1.0, m.mean(1))


def object_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each min-max normalised map's mass on the object's pixels, ``(B,)`` float64.

    A constant map (and any map that does not prefer the object) scores the object's share
    of the image; 1 = all mass on the object. Constant maps count as flat (mass everywhere).
    """
    m = _flat_normalised(maps)
    flat = maps.detach().flatten(1)
    m = torch.where((flat == flat[:, :1]).all(1, keepdim=True), 1.0, m)
    k = masks.reshape(m.shape).double()
    return (m * k).sum(1) / m.sum(1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of paired maps ``(B, ...)``, ``(B,)`` float64 (NaN if one is constant)."""
    x = a.detach().double().flatten(1)
    y = b.detach().double().flatten(1)
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    den = x.norm(dim=1) * y.norm(dim=1)
    return torch.where(den > 0, (x * y).sum(1) / den.clamp_min(1e-300), float("nan"))


def score_maps(
    maps: torch.Tensor, masks: torch.Tensor, groups: torch.Tensor, n_boot: int = 1000
) -> dict[str, Any]:
    """Standard pointing game (mean, 95 % bootstrap interval over ``groups``), uniformity, area.

    Args:
        maps: ``(P, 1, H, W)`` maps at the masks' resolution.
        masks: ``(P, H, W)`` bool object masks.
        groups: ``(P,)`` image ids (the bootstrap resamples whole images).
        n_boot: Bootstrap resamples.
    """
    hits = pointing_game(maps, masks, tolerance="standard")
    mean, lo, hi = bootstrap_ci(hits.numpy(), groups.numpy(), n_boot=n_boot, seed=0)
    return {
        "pointing_game": round(mean, 4),
        "ci": [round(lo, 4), round(hi, 4)],
        "uniformity": round(uniformity(maps).mean().item(), 4),
        "area": round(area(maps).mean().item(), 4),
        "object_mass": round(object_mass(maps, masks).mean().item(), 4),
        "n_maps": int(maps.shape[0]),
    }


# --------------------------------------------------------------------------------------------
# part A


class FitSpec:
    """A method's zoo settings on a zoo model: learning rate, seed, data seed, options."""

    def __init__(self, method: str, model: str) -> None:
        from train_mhex import ENTRIES as MHEX_ENTRIES
        from train_ttame import DATA_SEED
        from train_ttame import ENTRIES as TTAME_ENTRIES

        self.method, self.model = method, model
        if method == "ttame":
            e = TTAME_ENTRIES[f"{model}-ttame"]
            self.lr, self.seed, self.data_seed = e.lr, e.seed, DATA_SEED
            self.kwargs: dict[str, Any] = {"vit_features": e.vit_features} if e.vit_features else {}
            self.full = {"n_images": e.n_train, "steps": e.epochs * -(-e.n_train // e.batch_size),
                         "batch": e.batch_size, "epochs": e.epochs}  # fmt: skip
        else:
            e = MHEX_ENTRIES[f"{model}-mhex"]
            fit = {**MHEX.default_recipe.__dict__, **e.fit}
            self.lr, self.seed, self.data_seed = fit["lr"], e.train_seed, e.train_seed
            self.kwargs = dict(e.mhex)
            self.full = {"n_images": e.n_train, "steps": fit["epochs"] * -(-e.n_train // fit["batch_size"]),
                         "batch": fit["batch_size"], "epochs": fit["epochs"]}  # fmt: skip

    def build(self, backbone: torch.nn.Module) -> TTAME | MHEX:
        torch.manual_seed(self.seed)
        cls = TTAME if self.method == "ttame" else MHEX
        return cls(backbone, **self.kwargs)

    def fit(self, explainer: Any, images: torch.Tensor, labels: torch.Tensor, recipe: Any) -> None:
        if self.method == "ttame":
            explainer.fit(images, recipe)
        else:
            explainer.fit((images, labels), recipe, objective="bce")


def budget_epochs(n_images: int, steps: int, batch: int) -> tuple[int, int] | None:
    """``(epochs, actual steps)`` that take about ``steps`` steps over ``n_images`` images,
    or ``None`` when one epoch already takes more than ``steps`` steps."""
    per_epoch = -(-n_images // batch)
    if per_epoch > steps:
        return None
    epochs = max(1, round(steps / per_epoch))
    return epochs, epochs * per_epoch


def _eval_pairs(model: str, n_eval: int) -> tuple[torch.Tensor, ...]:
    """``(images, targets, masks, image ids)`` of every (image, present class) pair."""
    b = shapes(n_eval, EVAL_SEED, **{**zoo.data_kwargs(model), "min_objects": 2})
    pi, pc = b.labels.nonzero(as_tuple=True)
    return b.images[pi], pc, b.masks[pi, pc], pi


def _maps(explainer: Any, x: torch.Tensor, t: torch.Tensor, model: str) -> torch.Tensor:
    """Pixel maps ``(B, 1, H, W)``; a vision transformer's token maps upsampled bilinearly, as
    the evaluation's standard pointing game reads every method's token grid."""
    patch = model_patch(zoo.load(model))
    if patch is None:
        return torch.cat(
            [
                explainer.attribute(x[i : i + 256], target=t[i : i + 256])
                for i in range(0, len(x), 256)
            ]
        ).float()
    grids = torch.cat(
        [
            explainer.attribute(x[i : i + 256], target=t[i : i + 256], output="grid")
            for i in range(0, len(x), 256)
        ]
    )
    return to_pixels_bilinear(grids[:, 0].float(), tuple(x.shape[-2:]), patch)[:, None]


def part_a(
    n_images: Sequence[int],
    steps: Sequence[int],
    batch: int = 64,
    n_eval: int = 256,
    n_boot: int = 1000,
    models: Sequence[str] = MODELS,
    methods: Sequence[str] = METHODS,
    references: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Fits every method on every model at every budget and scores the maps.

    Args:
        n_images: Numbers of distinct training images (the first ``N`` of the pool).
        steps: Target numbers of optimiser steps (see :func:`budget_epochs`).
        batch: Batch size of every fit.
        n_eval: Fresh two-object images scored (two maps each).
        n_boot: Bootstrap resamples of the pointing game's interval.
        models, methods: Subsets of :data:`MODELS` and :data:`METHODS`.
        references: Also score GradCAM / TAM, the zoo's fitted entries and a constant map.
        progress: tqdm bar over the fits.

    Returns:
        ``{"fits": [...], "references": [...], "eval": {...}, "batch": batch}``.
    """
    jobs = []
    for model in models:
        for method in methods:
            for n in n_images:
                for s in steps:
                    plan = budget_epochs(n, s, batch)
                    if plan is not None:
                        jobs.append((model, method, n, s, *plan))
    fits: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    pools: dict[tuple[str, int], Any] = {}
    evals = {m: _eval_pairs(m, n_eval) for m in models}
    for model, method, n, s, epochs, actual in tqdm(jobs, desc="part A fits", disable=not progress):
        spec = FitSpec(method, model)
        key = (model, spec.data_seed)
        if key not in pools or len(pools[key].images) < n:
            pools[key] = shapes(max(n_images), spec.data_seed, **zoo.data_kwargs(model))
        pool = pools[key]
        explainer = spec.build(zoo.load(model))
        recipe = TrainingRecipe(
            epochs=epochs, batch_size=batch, lr=spec.lr, seed=spec.seed, show_progress=False
        )
        t0 = time.perf_counter()
        spec.fit(explainer, pool.images[:n], pool.labels[:n], recipe)
        fit_s = time.perf_counter() - t0
        explainer.eval()
        x, t, masks, groups = evals[model]
        with torch.no_grad():
            maps = _maps(explainer, x, t, model)
        fits.append({
            "model": model, "method": method, "n_images": n, "target_steps": s,
            "steps": actual, "epochs": epochs, "batch": batch, "lr": spec.lr,
            "fit_s": round(fit_s, 2), **score_maps(maps, masks, groups, n_boot),
        })  # fmt: skip
    if references:
        for model in models:
            x, t, masks, groups = evals[model]
            backbone = zoo.load(model)
            ref = GradCAM(backbone) if zoo.info(model)["family"] == "cnn" else TAM(backbone)
            name = "GradCAM" if isinstance(ref, GradCAM) else "TAM"
            refs.append({"model": model, "method": name, "kind": "no training",
                         **score_maps(_maps(ref, x, t, model), masks, groups, n_boot)})  # fmt: skip
            for method in methods:
                spec = FitSpec(method, model)
                fitted = zoo.load(f"{model}-{method}").eval()
                with torch.no_grad():
                    maps = _maps(fitted, x, t, model)
                refs.append({"model": model, "method": method, "kind": "zoo (full recipe)",
                             **spec.full, **score_maps(maps, masks, groups, n_boot)})  # fmt: skip
            refs.append({"model": model, "method": "constant map", "kind": "chance",
                         **score_maps(torch.zeros(len(x), 1, *x.shape[-2:]), masks, groups, 0)})  # fmt: skip
    return {
        "fits": fits,
        "references": refs,
        "batch": batch,
        "eval": {
            "seed": EVAL_SEED, "images": n_eval, "min_objects": 2,
            "maps": {m: int(evals[m][0].shape[0]) for m in models},
            "tolerance": "standard (15 px at 224 px; 2 px at 32 px)", "n_boot": n_boot,
        },
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# part B


def _b_images(n: int, size: int) -> torch.Tensor:
    """``n`` procedural images (56 px free-layout shapes) upsampled bilinearly to ``size``."""
    b = shapes(n, B_SEED, layout="free", size=56)
    return F.interpolate(b.images, size=(size, size), mode="bilinear", align_corners=False)


def part_b(
    budgets: Sequence[tuple[int, int]],
    arch: str = "resnet50",
    num_classes: int = 1000,
    size: int = 224,
    batch: int = 8,
    n_heldout: int = 8,
    threads: Sequence[int] = (1,),
    progress: bool = True,
) -> dict[str, Any]:
    """Cost, agreement and map stability of T-TAME and MHEX on a random-init timm CNN.

    Args:
        budgets: ``(N images, epochs)`` pairs; the largest (most steps) is the reference of
            the maps' correlation.
        arch, num_classes, size: The timm model (random init, seed 0) and the input side.
        batch: Batch size of every fit.
        n_heldout: Held-out images for maps, correlation and held-out agreement.
        threads: Thread counts timed on the smallest budget (the grid runs on the first).
        progress: tqdm bar over the fits.
    """
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=num_classes).eval()
    n_max = max(n for n, _ in budgets)
    images = _b_images(n_max + n_heldout, size)
    with torch.no_grad():
        labels = torch.cat(
            [model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)]
        )
        top2 = torch.cat([model(images[i : i + batch]).topk(2).values for i in range(0, len(images), batch)])  # fmt: skip
    held_x, held_y = images[n_max:], labels[n_max:]
    rows: list[dict[str, Any]] = []
    held_maps: dict[tuple[str, int, int], torch.Tensor] = {}
    base_threads = torch.get_num_threads()
    timing = [(t, min(budgets, key=lambda b: (b[0] * b[1], b))) for t in threads[1:]]
    jobs = [(m, n, e, threads[0]) for m in METHODS for n, e in budgets]
    jobs += [(m, n, e, t) for m in METHODS for t, (n, e) in timing]
    for method, n, epochs, n_threads in tqdm(jobs, desc="part B fits", disable=not progress):
        torch.set_num_threads(n_threads)
        try:
            torch.manual_seed(0)
            explainer = TTAME(model) if method == "ttame" else MHEX(model)
            if (method, "init") not in held_maps:  # the unfitted module's maps, same seed
                with torch.no_grad():
                    held_maps[(method, "init")] = (
                        explainer.mark_fitted().eval().attribute(held_x, target=held_y)
                    )
                torch.manual_seed(0)
                explainer = TTAME(model) if method == "ttame" else MHEX(model)
            recipe = TrainingRecipe(epochs=epochs, batch_size=batch, show_progress=False)
            steps = epochs * -(-n // batch)
            reset = _reset_hwm()
            t0 = time.perf_counter()
            if method == "ttame":
                explainer.fit(images[:n], recipe)
            else:
                explainer.fit((images[:n], labels[:n]), recipe, objective="ce")
            fit_s = time.perf_counter() - t0
            peak = _hwm_bytes() / 2**20
        finally:
            torch.set_num_threads(base_threads)
        row: dict[str, Any] = {
            "method": method, "n_images": n, "epochs": epochs, "steps": steps,
            "threads": n_threads, "s_per_step": round(fit_s / steps, 3),
            "peak_rss_mb": round(peak, 1), "peak_rss_reset": reset,
        }  # fmt: skip
        if n_threads == threads[0]:
            explainer.eval()
            with torch.no_grad():
                maps = explainer.attribute(held_x, target=held_y)
                held_maps[(method, n, epochs)] = maps
                row["uniformity"] = round(uniformity(maps).mean().item(), 4)
                row["area"] = round(area(maps).mean().item(), 4)
                if method == "mhex":
                    net = explainer.network
                    fitted = torch.cat([net(images[i : min(i + batch, n)]).argmax(1)
                                        for i in range(0, n, batch)])  # fmt: skip
                    row["agreement_fitted"] = round((fitted == labels[:n]).float().mean().item(), 4)
                    row["agreement_heldout"] = round(
                        (net(held_x).argmax(1) == held_y).float().mean().item(), 4
                    )
        rows.append(row)
    ref = max(budgets, key=lambda b: (-(-b[0] // batch) * b[1], b[0]))
    for row in rows:
        key = (row["method"], row["n_images"], row["epochs"])
        if row["threads"] == threads[0]:
            r = pearson(held_maps[key], held_maps[(row["method"], *ref)])
            row["pearson_to_largest"] = round(r.nanmean().item(), 4)
            r0 = pearson(held_maps[key], held_maps[(row["method"], "init")])
            row["pearson_to_init"] = round(r0.nanmean().item(), 4)
    return {
        "rows": rows,
        "model": f"timm {arch}, {num_classes} classes, random init (torch.manual_seed(0)), eval mode",
        "inputs": f"shapes(layout='free', size=56, seed={B_SEED}) upsampled bilinearly to {size} px",
        "batch": batch,
        "largest_budget": {"n_images": ref[0], "epochs": ref[1]},
        "n_heldout": n_heldout,
        "plain_top1": {
            "distinct_classes": int(labels.unique().numel()),
            "images": len(labels),
            "median_margin": round((top2[:, 0] - top2[:, 1]).median().item(), 5),
        },
    }


# --------------------------------------------------------------------------------------------
# report


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt_pg(r: dict[str, Any]) -> str:
    lo, hi = r["ci"]
    if math.isnan(lo):
        return f"{r['pointing_game']:.3f}"
    return f"{r['pointing_game']:.3f} [{lo:.2f}, {hi:.2f}]"


def minimum_budgets(result: dict[str, Any], margin: float = 0.05) -> list[dict[str, Any]]:
    """Per (model, method): the fits within ``margin`` of the zoo's full recipe, smallest first.

    ``smallest`` is the fit with the fewest steps (then images) whose pointing game is at
    least the zoo entry's minus ``margin``; ``None`` when no fit reaches it.
    """
    a = result["part_a"]
    out = []
    for ref in a["references"]:
        if ref["kind"] != "zoo (full recipe)":
            continue
        ok = [f for f in a["fits"] if f["model"] == ref["model"] and f["method"] == ref["method"]
              and f["pointing_game"] >= ref["pointing_game"] - margin]  # fmt: skip
        best = min(ok, key=lambda f: (f["steps"], f["n_images"])) if ok else None
        fewest_images = min(ok, key=lambda f: (f["n_images"], f["steps"])) if ok else None
        out.append({"model": ref["model"], "method": ref["method"], "zoo": ref["pointing_game"],
                    "fewest_steps": best, "fewest_images": fewest_images})  # fmt: skip
    return out


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "–"


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report of a run."""
    meta, a = result["meta"], result["part_a"]
    lines = [
        "# Fitting budget of T-TAME and MHEX",
        "",
        f"Made by `{meta['command']}` on {meta['date']} (commit {meta['commit']}, "
        f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s); the machine's "
        "2 cores were shared with other jobs, so times are indicative). Reading and guidance: "
        "`docs/fitting.md`.",
        "",
        "## A. Map quality against ground truth (zoo's trained shapes models)",
        "",
        f"Batch {a['batch']}; scored on {a['eval']['images']} fresh two-object images (seed "
        f"{a['eval']['seed']}, every present class explained): pointing game at the standard "
        "tolerance (2 px at 32 px) with a 95 % bootstrap interval over images; uniformity = "
        "normalised entropy of the min-max normalised map (1 = constant); area = mean of the "
        "min-max normalised map; object mass = share of the normalised map's mass on the "
        "object's pixels (a flat map scores the object's share of the image).",
        "",
    ]
    for model in dict.fromkeys(f["model"] for f in a["fits"]):
        for method in dict.fromkeys(f["method"] for f in a["fits"]):
            fits = [f for f in a["fits"] if f["model"] == model and f["method"] == method]
            if not fits:
                continue
            ns = sorted({f["n_images"] for f in fits})
            ss = sorted({f["target_steps"] for f in fits})
            lines += [f"### {method.upper().replace('TTAME', 'T-TAME')} on {model}: pointing game "
                      "[95 % CI]; u = uniformity; m = object mass", "",
                      "| steps \\ N | " + " | ".join(str(n) for n in ns) + " |",
                      "|---|" + "---|" * len(ns)]  # fmt: skip
            for s in ss:
                cells = []
                for n in ns:
                    f = next(
                        (f for f in fits if f["n_images"] == n and f["target_steps"] == s), None
                    )
                    cells.append(
                        "–"
                        if f is None
                        else f"{_fmt_pg(f)}; u {f['uniformity']:.2f}; m {f['object_mass']:.2f}"
                    )
                lines.append(f"| ~{s} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["### References", "",
              "| model | method | kind | budget | pointing game | uniformity | area | object mass |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in a["references"]:
        budget = (
            f"N={r['n_images']}, {r['steps']} steps (batch {r['batch']})" if "steps" in r else "–"
        )
        lines.append(f"| {r['model']} | {r['method']} | {r['kind']} | {budget} | {_fmt_pg(r)} | "
                     f"{r['uniformity']:.3f} | {r['area']:.3f} | {r['object_mass']:.3f} |")  # fmt: skip
    lines.append("")
    if a["references"]:
        lines += ["### Smallest budgets within 0.05 of the full recipe", "",
                  "| model | method | zoo | fewest steps (N, steps, PG) | fewest images (N, steps, PG) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for m in minimum_budgets(result):

            def cell(f: dict[str, Any] | None) -> str:
                return (
                    "none in the grid"
                    if f is None
                    else (f"N={f['n_images']}, {f['steps']} steps, {f['pointing_game']:.3f}")
                )

            lines.append(f"| {m['model']} | {m['method']} | {m['zoo']:.3f} | "
                         f"{cell(m['fewest_steps'])} | {cell(m['fewest_images'])} |")  # fmt: skip
        lines.append("")
    fit_rows = a["fits"]
    if fit_rows:
        lines += [f"Fit times: {min(f['fit_s'] for f in fit_rows):.1f}–"
                  f"{max(f['fit_s'] for f in fit_rows):.1f} s per fit; "
                  f"{sum(f['fit_s'] for f in fit_rows):.0f} s in all.", ""]  # fmt: skip
    b = result.get("part_b")
    if b:
        p = b["plain_top1"]
        lines += [
            "## B. Cost, agreement and stability on an ImageNet-size network (random init)",
            "",
            f"{b['model']}; inputs {b['inputs']}; batch {b['batch']}. **Random weights**: the "
            "maps localise nothing, only cost, agreement and stability are measured. The plain "
            f"model's top-1 over the {p['images']} images: {p['distinct_classes']} distinct "
            f"class(es), median top-1 margin {p['median_margin']} logits (a random network's "
            "predictions are nearly ties, which makes agreement fragile). Pearson = mean "
            f"correlation of the {b['n_heldout']} held-out maps with those of the largest budget "
            f"(N={b['largest_budget']['n_images']}, {b['largest_budget']['epochs']} epochs); Pearson to "
            "unfitted = with the maps of the same module before any step (same seed): near 1 "
            "means fitting has not yet changed the map. "
            "Peak RSS: the process's peak resident memory during the fit (VmHWM reset before it "
            "where Linux allows; it includes the model and data).",
            "",
            "| method | N | epochs | steps | threads | s / step | peak RSS (MB) | uniformity | "
            "Pearson to largest | Pearson to unfitted | agreement fitted | agreement held-out |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in b["rows"]:
            g = functools.partial(_cell, r)
            lines.append(
                f"| {r['method']} | {r['n_images']} | {r['epochs']} | {r['steps']} | "
                f"{r['threads']} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | "
                f"{g('uniformity')} | {g('pearson_to_largest')} | {g('pearson_to_init')} | "
                f"{g('agreement_fitted')} | "
                f"{g('agreement_heldout')} |"
            )
        lines.append("")
    return "\n".join(lines)


def render_figure(result: dict[str, Any], path: Path) -> None:
    """Pointing game (top row) and uniformity (bottom row) against steps, one colour per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    a = result["part_a"]
    panels = list(dict.fromkeys((f["model"], f["method"]) for f in a["fits"]))
    if not panels:
        return
    ns = sorted({f["n_images"] for f in a["fits"]})
    norm = LogNorm(vmin=min(ns), vmax=max(max(ns), min(ns) * 2))
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 6.4), squeeze=False,
                             sharex=True, constrained_layout=True)  # fmt: skip
    for j, (model, method) in enumerate(panels):
        for n in ns:
            fits = sorted((f for f in a["fits"] if f["model"] == model and f["method"] == method
                           and f["n_images"] == n), key=lambda f: f["steps"])  # fmt: skip
            if not fits:
                continue
            st = [f["steps"] for f in fits]
            axes[0, j].errorbar(st, [f["pointing_game"] for f in fits],
                                yerr=[[max(0.0, f["pointing_game"] - f["ci"][0]) for f in fits],
                                      [max(0.0, f["ci"][1] - f["pointing_game"]) for f in fits]],
                                color=cmap(norm(n)), marker="o", ms=3, capsize=2)  # fmt: skip
            axes[1, j].plot(st, [f["uniformity"] for f in fits], color=cmap(norm(n)),
                            marker="o", ms=3)  # fmt: skip
        for r in a["references"]:
            if r["model"] != model:
                continue
            style = None
            if r["kind"] == "zoo (full recipe)" and r["method"] == method:
                style = dict(color="black", ls="--", label=f"zoo fit ({r['steps']} steps)")
            elif r["kind"] == "no training":
                style = dict(color="tab:red", ls=":", label=r["method"])
            elif r["kind"] == "chance":
                style = dict(color="grey", ls="-.", label="constant map")
            if style:
                axes[0, j].axhline(r["pointing_game"], lw=1, **style)
                axes[1, j].axhline(r["uniformity"], lw=1, **style)
        name = "T-TAME" if method == "ttame" else "MHEX"
        axes[0, j].set_title(f"{name} on {model}", fontsize=10)
        axes[0, j].set_ylim(0, 1.02)
        axes[1, j].set_ylim(0.5, 1.02)
        axes[1, j].set_xscale("log", base=2)
        axes[1, j].set_xlabel(f"optimiser steps (batch {a['batch']})")
        axes[0, j].legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("pointing game (standard tolerance)")
    axes[1, 0].set_ylabel("uniformity (normalised entropy)")
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes, label="distinct training images N", shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], stem: Path) -> list[Path]:
    """Writes ``<stem>.json``, ``.md`` and ``.png``; returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    paths[1].write_text(render_markdown(result))
    render_figure(result, paths[2])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run on a tiny grid")
    p.add_argument("--n-images", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--batch", type=int, default=64, help="part A batch size")
    p.add_argument("--n-eval", type=int, default=256, help="fresh two-object images scored")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--budgets-b", type=str, nargs="+", default=["8x1", "8x3", "32x1", "32x3", "128x1"],
                   help="part B budgets as NxEPOCHS")  # fmt: skip
    p.add_argument(
        "--threads-b",
        type=int,
        nargs="+",
        default=[1, 2],
        help="part B thread counts (the first runs the grid, the others are timed)",
    )
    p.add_argument("--size-b", type=int, default=224, help="part B input side")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (part A)")
    p.add_argument(
        "--out", type=Path, default=None, help="output stem (default results/fit_budget)"
    )
    p.add_argument("--from-json", type=Path, default=None, help="re-render a run's json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        stem = args.out or args.from_json.with_suffix("")
        for path in write_outputs(result, stem):
            print(path)
        return 0
    if args.quick:
        args.n_images, args.steps, args.n_eval, args.n_boot = [16, 64], [4, 16], 32, 200
        args.budgets_b, args.threads_b, args.size_b = ["8x1", "16x1"], [1], 64
    try:
        budgets_b = [tuple(int(v) for v in b.lower().split("x")) for b in args.budgets_b]
        assert all(len(b) == 2 and min(b) >= 1 for b in budgets_b)
    except (ValueError, AssertionError):
        p.error(
            f"--budgets-b: expected NxEPOCHS with positive ints (e.g. 32x3); got {args.budgets_b}"
        )
    torch.set_num_threads(args.threads)
    command = (
        "python benchmarks/fit_budget.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    result: dict[str, Any] = {
        "meta": {
            "command": command.strip(),
            "date": datetime.date.today().isoformat(),
            "commit": _git_commit(),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "torch": torch.__version__.split("+")[0],
            "threads": args.threads,
        },
        "part_a": {"fits": [], "references": [], "batch": args.batch, "eval": {}},
    }
    t0 = time.perf_counter()
    if not args.skip_a:
        result["part_a"] = part_a(args.n_images, args.steps, args.batch, args.n_eval,
                                  args.n_boot, progress=not args.no_progress)  # fmt: skip
    if not args.skip_b:
        result["part_b"] = part_b(budgets_b, size=args.size_b, threads=args.threads_b,
                                  progress=not args.no_progress)  # fmt: skip
    result["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    stem = args.out or RESULTS / ("fit_budget_quick" if args.quick else "fit_budget")
    for path in write_outputs(result, stem):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
