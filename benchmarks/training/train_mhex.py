"""Train MHEX into the zoo's CNN, ViT and BERT and measure it; writes the ``*-mhex`` zoo entries.

    python benchmarks/training/train_mhex.py [--only NAME ...] [--out captum_ext/zoo/weights]

Every entry wraps a shipped zoo model (its ``backbone_model``) in :class:`captum_ext.MHEX` with
the class's defaults (CNN: gates and heads after ``layer2``, ``layer3``, ``layer4``;
transformers: after the embeddings and block 0, the ViT entry after the embeddings only;
mean-pooled token heads; geometric fusion),
trains gates and heads with ``MHEX.fit`` (the package's one training loop; the model's own
weights frozen, its BatchNorm statistics untouched) on a fixed procedurally generated training
set whose seed no other entry or test uses, and measures, on data generated with seeds never
used in training:

* held-out accuracy of the gated network and of the plain model on the zoo's held-out set
  (2048 examples, seed 424242; set accuracy for the multi-label images, argmax accuracy for
  text);
* localisation on fresh two-object images (512 images with exactly two objects, seed
  515151): pointing game and class discrimination D on the 4 x 4 cell grid, as the package's
  evaluation does (maps average-pooled to the cells, masks max-pooled), the pointing game
  also in pixels (no tolerance, and Zhang et al.'s standard 2 px at 32 px, which reads a
  transformer's token maps upsampled bilinearly, as the evaluation does); per stage too;
* Average Drop (Grad-CAM++; :func:`captum_ext.metrics.average_drop`, sigmoid score of the
  predicted class, min-max normalised map kept at 100 / 50 / 15 %);
* text: token AUPRC of the label's map against the planted rationale, and D between the
  rationale and the counter word of sequences that have one (512 sequences, seed 515151);
* cost of ``attribute`` against a plain forward of the model and of the gated network
  (batch 64, one thread, the three calls interleaved over 15 rounds of the suite's
  ``Timer``-based harness, medians);
* the heads' collaboration: :meth:`captum_ext.MHEX.gradient_similarity` on 256 held-out
  examples.

The paper's SAD and EAD metrics have no published definition available to us and are not
computed.

``--cost-at-scale`` measures only the cost, of untrained MHEX on random-weight ResNet-50,
ViT-S/16 and a BERT-base-sized model (batch 8, one thread).

Recipe: ``MHEX.fit`` defaults (4 epochs of 8192 examples, batch 128, SGD Nesterov one-cycle,
peak lr 0.05, model frozen, gates feeding the heads only: the gated network's scores are the
model's) except lr 0.01 and the embeddings as the only stage for the ViT (with block 0 fused in,
the standard pointing game on this script's data was 0.834 against 0.900).

Measured results (accuracy, localisation, AD, cost, train time, per stage, collaboration):
``benchmarks/results/training.md``; each entry's record holds its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from _suite_measure import interleaved

from captum_ext import MHEX, TrainingRecipe, zoo
from captum_ext.adapters import adapter_for
from captum_ext.data import shapes, text_rationales
from captum_ext.evaluation._maps import model_patch, to_pixels_bilinear
from captum_ext.metrics import (
    average_drop,
    discrimination_score,
    pointing_game,
    token_auprc,
)

__all__ = ["ENTRIES", "Entry", "evaluate", "main", "train_entry"]

HELDOUT_SEED = 424242
"""The zoo's held-out seed (train_zoo.py): accuracy of the gated network vs the plain model."""
HELDOUT_N = 2048
EVAL_SEED = 515151
"""Fresh two-object images / sequences for localisation and discrimination."""
EVAL_N = 512
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "captum_ext" / "zoo" / "weights"


@dataclass(frozen=True)
class Entry:
    """An MHEX zoo entry.

    Attributes:
        name: Zoo name (``<backbone>-mhex``).
        backbone: The zoo model it is trained into.
        objective: ``"bce"`` (multi-label images) or ``"ce"`` (text).
        train_seed: Seed of the training set (used by no other entry or test).
        n_train: Size of the training set.
        fit: Fields of the :class:`~captum_ext.TrainingRecipe` passed to :meth:`MHEX.fit`.
        mhex: Keyword arguments of :class:`MHEX` beyond the defaults.
    """

    name: str
    backbone: str
    objective: str
    train_seed: int
    n_train: int = 8192
    fit: dict[str, Any] = field(default_factory=dict)
    mhex: dict[str, Any] = field(default_factory=dict)


_RECIPE = dict(epochs=4, batch_size=128, lr=0.05)
ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("shapes-cnn-mhex", "shapes-cnn", "bce", 41, fit=_RECIPE),
        Entry(
            "shapes-vit-mhex",
            "shapes-vit",
            "bce",
            42,
            fit={**_RECIPE, "lr": 0.01},
            mhex={"layers": ["embeddings"]},
        ),
        Entry("text-bert-mhex", "text-bert", "ce", 43, fit=_RECIPE),
    )
}


# --------------------------------------------------------------------------------------------
# data


def training_set(entry: Entry, data_kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """``(images, labels)`` or ``(input_ids, attention_mask, labels)`` of the entry."""
    if entry.objective == "ce":
        b = text_rationales(entry.n_train, entry.train_seed, **data_kwargs)
        return b.input_ids, b.attention_mask, b.labels.long()
    b = shapes(entry.n_train, entry.train_seed, **data_kwargs)
    return b.images, b.labels


# --------------------------------------------------------------------------------------------
# measurements


def _set_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return ((logits > 0) == (labels > 0.5)).all(dim=1).float().mean().item()


@torch.no_grad()
def heldout_accuracy(fn: Any, text: bool, data_kwargs: dict[str, Any]) -> float:
    """Held-out accuracy of ``fn`` (logits) on the zoo's held-out set."""
    if text:
        b = text_rationales(HELDOUT_N, HELDOUT_SEED, **data_kwargs)
        logits = torch.cat(
            [
                fn(b.input_ids[i : i + 512], b.attention_mask[i : i + 512])
                for i in range(0, HELDOUT_N, 512)
            ]
        )
        return (logits.argmax(1) == b.labels).float().mean().item()
    b = shapes(HELDOUT_N, HELDOUT_SEED, **data_kwargs)
    logits = torch.cat([fn(b.images[i : i + 512]) for i in range(0, HELDOUT_N, 512)])
    return _set_accuracy(logits, b.labels)


def _cells(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return F.adaptive_avg_pool2d(maps.float(), grid)[:, 0]


def _localisation(
    maps: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], patch: Any = None
) -> dict:
    """Pointing game (cells; pixels at 0 px and at the standard 2-px tolerance) and D (cells)
    of pair-ordered maps ``(2P, 1, H, W)``. With a transformer's ``patch`` the standard
    pointing game reads the cells upsampled bilinearly, as the package's evaluation reads
    every token map."""
    cells = _cells(maps, grid)
    point = maps
    if patch is not None:
        point = to_pixels_bilinear(cells, tuple(maps.shape[-2:]), patch)
    cmask = F.adaptive_max_pool2d(masks[:, None].float(), grid)[:, 0] > 0
    d = discrimination_score(cells[0::2], cells[1::2], cmask[0::2], cmask[1::2])
    return {
        "pointing_game": round(pointing_game(cells, cmask).nanmean().item(), 4),
        "pointing_game_pixels": round(pointing_game(maps, masks).nanmean().item(), 4),
        "pointing_game_standard": round(
            pointing_game(point, masks, tolerance="standard").nanmean().item(), 4
        ),
        "discrimination": round(d.mean().item(), 4),
    }


def image_metrics(mhex: MHEX, data_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Localisation, discrimination and Average Drop on fresh two-object images."""
    batch = shapes(EVAL_N, EVAL_SEED, **{**data_kwargs, "min_objects": 2})
    pi, pc = batch.labels.nonzero(as_tuple=True)  # image-major: the two classes of an image
    assert bool((pi[0::2] == pi[1::2]).all())
    grid = (4, 4)
    patch = model_patch(mhex.network.model)
    x = batch.images[pi]
    maps = torch.cat(
        [mhex.attribute(x[i : i + 256], pc[i : i + 256]) for i in range(0, len(pi), 256)]
    )
    out: dict[str, Any] = {
        "data": {"seed": EVAL_SEED, "images": EVAL_N, "maps": len(pi), "grid": list(grid)},
        **_localisation(maps, batch.masks[pi, pc], grid, patch),
    }
    stages = []
    for i, _ in enumerate(mhex.stages):
        w = [0.0] * len(mhex.stages)
        w[i] = 1.0
        saved = mhex.stage_weights
        mhex.stage_weights = w
        try:
            one = torch.cat(
                [mhex.attribute(x[j : j + 256], pc[j : j + 256]) for j in range(0, len(pi), 256)]
            )
        finally:
            mhex.stage_weights = saved
        stages.append(
            {"layer": mhex.stages[i].layer, **_localisation(one, batch.masks[pi, pc], grid, patch)}
        )
    out["stages"] = stages
    mhex.fusion = "mean"  # the alternative fusion, for comparison
    try:
        mean = torch.cat(
            [mhex.attribute(x[j : j + 256], pc[j : j + 256]) for j in range(0, len(pi), 256)]
        )
    finally:
        mhex.fusion = "geometric"
    out["fusion_mean"] = _localisation(mean, batch.masks[pi, pc], grid, patch)
    ad = {}
    images = batch.images
    for keep in (1.0, 0.5, 0.15):
        v = average_drop(mhex.network, images, mhex, keep=keep, score="sigmoid", batch_size=256)
        ad[f"AD{round(keep * 100)}"] = round(v.nanmean().item(), 2)
    out["average_drop"] = {"target": "predicted class", "score": "sigmoid", **ad}
    return out


def text_metrics(mhex: MHEX, data_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Token AUPRC against the rationale and rationale-vs-counter discrimination."""
    b = text_rationales(EVAL_N, EVAL_SEED, **data_kwargs)
    extra = (b.attention_mask,)
    valid = ~adapter_for(mhex.network.model).special_tokens(b.input_ids, extra)
    maps = mhex.attribute_targets(
        b.input_ids, [b.labels, 1 - b.labels], additional_forward_args=extra
    )
    has = b.counter.any(1)
    d = discrimination_score(
        maps[0][has][:, None],
        maps[1][has][:, None],
        b.rationale[has][:, None],
        b.counter[has][:, None],
    )
    out: dict[str, Any] = {
        "data": {"seed": EVAL_SEED, "sequences": EVAL_N, "with_counter_word": int(has.sum())},
        "token_auprc": round(token_auprc(maps[0], b.rationale, valid).nanmean().item(), 4),
        "discrimination": round(d.mean().item(), 4),
    }
    stages = []
    cams = mhex.stage_cams(b.input_ids, extra)
    for stage, cam in zip(mhex.stages, cams, strict=True):
        s = cam[torch.arange(EVAL_N), b.labels]
        stages.append(
            {
                "layer": stage.layer,
                "token_auprc": round(token_auprc(s, b.rationale, valid).nanmean().item(), 4),
            }
        )
    out["stages"] = stages
    window = mhex.window
    mhex.window = 3  # smoothing along the sequence, for comparison
    try:
        smooth = mhex.attribute(b.input_ids, b.labels, extra)
    finally:
        mhex.window = window
    out["token_auprc_window3"] = round(token_auprc(smooth, b.rationale, valid).nanmean().item(), 4)
    return out


def _cost(mhex: MHEX, x: torch.Tensor, extra: tuple, rounds: int = 15) -> dict[str, Any]:
    """Seconds of ``attribute`` vs a plain forward of the model and of the gated network.

    One thread (the shared machine's other jobs disturb multi-threaded timings most); the
    suite's harness (``_suite_measure.interleaved``): the three calls in turn, ``rounds``
    rounds of ``Timer.blocked_autorange``, medians.
    """
    model = mhex.network.model

    def plain() -> None:
        with torch.no_grad():
            model(x, *extra)

    def gated() -> None:
        with torch.no_grad():
            mhex.network(x, *extra)

    def explain() -> None:
        mhex.attribute(x, target=0, additional_forward_args=extra or None)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        med, _ = interleaved(
            {"forward_s": plain, "gated_forward_s": gated, "attribute_s": explain},
            rounds,
            min_run_time=0.05,
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "batch": int(x.shape[0]),
        "threads": 1,
        **{k: round(v, 5) for k, v in med.items()},
        "attribute_over_forward": round(med["attribute_s"] / med["forward_s"], 3),
        "attribute_over_gated_forward": round(med["attribute_s"] / med["gated_forward_s"], 3),
    }


def cost(mhex: MHEX, text: bool, data_kwargs: dict[str, Any], batch: int = 64) -> dict[str, Any]:
    """:func:`_cost` on ``batch`` fresh examples of the entry's data."""
    if text:
        b = text_rationales(batch, EVAL_SEED, **data_kwargs)
        return _cost(mhex, b.input_ids, (b.attention_mask,))
    return _cost(mhex, shapes(batch, EVAL_SEED, **data_kwargs).images, ())


def cost_at_scale() -> list[dict[str, Any]]:
    """:func:`_cost` of MHEX (defaults, untrained: the cost does not depend on training) around
    randomly initialised models of common sizes: timm ResNet-50 and ViT-S/16 (8 images of
    224 x 224) and a BERT-base-sized encoder (8 sequences of 128 tokens)."""
    import timm
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 224, 224, generator=g)
    ids = torch.randint(5, 30000, (8, 128), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    out = []
    for name, model, x, extra in (
        ("timm resnet50", timm.create_model("resnet50", num_classes=10), images, ()),
        ("timm vit_small_patch16_224", timm.create_model("vit_small_patch16_224", num_classes=10),
         images, ()),
        ("BERT-base size", BertForSequenceClassification(BertConfig(num_labels=2)), ids,
         (torch.ones_like(ids),)),
    ):  # fmt: skip
        mhex = MHEX(model.eval())
        out.append({"model": name, **_cost(mhex, x, extra, rounds=7)})
    return out


def collaboration(mhex: MHEX, entry: Entry, data_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The heads' gradient cosine similarity on 256 held-out examples."""
    if entry.objective == "ce":
        b = text_rationales(256, HELDOUT_SEED, **data_kwargs)
        batch = (b.input_ids, b.attention_mask, b.labels.long())
    else:
        b = shapes(256, HELDOUT_SEED, **data_kwargs)
        batch = (b.images, b.labels)
    sim = mhex.gradient_similarity(batch, objective=entry.objective)
    return {
        "heads": mhex.head_names,
        "cosine": [[round(v, 4) for v in row] for row in sim.tolist()],
    }


def evaluate(mhex: MHEX, entry: Entry) -> dict[str, Any]:
    """Every measurement of an entry (see the module docstring)."""
    data_kwargs = zoo.data_kwargs(entry.backbone)
    text = entry.objective == "ce"
    plain = zoo.load(entry.backbone)

    def plain_logits(*args: torch.Tensor) -> torch.Tensor:
        return adapter_for(plain).forward(args[0], args[1:] or None)

    with torch.no_grad():
        mhex.eval()
        acc = heldout_accuracy(mhex.network, text, data_kwargs)
    out = {
        "heldout": {
            "seed": HELDOUT_SEED,
            "n": HELDOUT_N,
            "metric": "accuracy" if text else "set_accuracy",
            "accuracy": round(acc, 5),
            "backbone_accuracy": round(heldout_accuracy(plain_logits, text, data_kwargs), 5),
        },
        ("text" if text else "localisation"): (
            text_metrics(mhex, data_kwargs) if text else image_metrics(mhex, data_kwargs)
        ),
        "collaboration": collaboration(mhex, entry, data_kwargs),
        "cost": cost(mhex, text, data_kwargs),
    }
    return out


# --------------------------------------------------------------------------------------------
# training


def train_entry(entry: Entry, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train one entry, measure it and write ``<out>/<name>.safetensors`` + ``.json``."""
    start = time.perf_counter()
    info = zoo.info(entry.backbone)
    data_kwargs = zoo.data_kwargs(entry.backbone)
    torch.manual_seed(entry.train_seed)
    mhex = MHEX(zoo.load(entry.backbone), **entry.mhex)
    data = training_set(entry, data_kwargs)
    t0 = time.perf_counter()
    mhex.fit(data, TrainingRecipe(show_progress=progress, **entry.fit), objective=entry.objective)
    train_s = time.perf_counter() - t0
    measured = evaluate(mhex, entry)
    import timm
    import transformers

    extra = {
        "name": entry.name,
        "kind": "explainer",
        "backbone_model": entry.backbone,
        "modality": info["modality"],
        "task": info["task"],
        "classes": info["classes"],
        "data": {
            "generator": info["data"]["generator"],
            "kwargs": data_kwargs,
            "train": {"seed": entry.train_seed, "n": entry.n_train},
        },
        **measured,
        "train_time_s": round(train_s, 1),
        "total_time_s": round(time.perf_counter() - start, 1),
        "train_threads": torch.get_num_threads(),
        "command": f"python benchmarks/training/train_mhex.py --only {entry.name}",
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    paths = mhex.save(out / entry.name, extra=extra)
    return zoo.info(entry.name, directory=paths.record.parent)


def _summary(rec: dict[str, Any]) -> str:
    h = rec["heldout"]
    parts = [
        f"{rec['name']}: accuracy {h['accuracy']:.4f} (plain {h['backbone_accuracy']:.4f})",
        f"train {rec['train_time_s']:.0f} s",
        f"attribute/forward {rec['cost']['attribute_over_forward']:.2f}",
        f"file {rec['weights']['bytes'] / 1e3:.0f} kB",
    ]
    if "localisation" in rec:
        loc = rec["localisation"]
        parts.insert(1, f"pointing {loc['pointing_game']:.3f}, D {loc['discrimination']:.3f}")
        parts.insert(
            2,
            "AD "
            + "/".join(f"{v:.1f}" for k, v in loc["average_drop"].items() if k.startswith("AD")),
        )
    else:
        t = rec["text"]
        parts.insert(1, f"AUPRC {t['token_auprc']:.3f}, D {t['discrimination']:.3f}")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 1 if an entry misses a target."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(ENTRIES), help="train these entries only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--cost-at-scale",
        action="store_true",
        help="only time MHEX on ResNet-50, ViT-S/16 and a BERT-base-sized model (random)",
    )
    args = p.parse_args(argv)
    if args.cost_at_scale:
        for row in cost_at_scale():
            print(
                f"{row['model']}: attribute {row['attribute_s'] * 1e3:.1f} ms, forward "
                f"{row['forward_s'] * 1e3:.1f} ms ({row['attribute_over_forward']:.3f}x), gated "
                f"forward {row['gated_forward_s'] * 1e3:.1f} ms "
                f"({row['attribute_over_gated_forward']:.3f}x), batch {row['batch']}, 1 thread"
            )
        return 0
    failed = []
    for name in args.only or list(ENTRIES):
        rec = train_entry(ENTRIES[name], args.out, progress=not args.no_progress)
        print(_summary(rec), flush=True)
        h = rec["heldout"]
        if h["accuracy"] < h["backbone_accuracy"] - 0.01:
            failed.append(f"{name}: accuracy more than 1 point below the plain model")
        loc = rec.get("localisation")
        if loc and (loc["pointing_game"] < 0.8 or loc["discrimination"] <= 0.8):
            failed.append(f"{name}: pointing game < 0.8 or D <= 0.8")
    for f in failed:
        print(f"target missed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
