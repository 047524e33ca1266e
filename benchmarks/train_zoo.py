"""Train the model zoo (``captum_ext.zoo``) on the procedural benchmark data, on CPU.

    python benchmarks/train_zoo.py [--only NAME ...] [--out captum_ext/zoo/weights]

Every entry is seeded (``torch.manual_seed`` for initialisation and batch order, fixed data
seeds for the training sets), trained with AdamW and a one-cycle cosine schedule on a fixed
procedurally generated training set (random horizontal flips for images), evaluated on fresh
held-out data generated with a seed never used in training, and written as
``<name>.safetensors`` (float32 state dict) plus ``<name>.json`` (architecture, data settings,
recipe, held-out accuracy, train time, the command that reproduces it).

Image accuracy is *set accuracy*: the predicted set ``{k : sigmoid(logit_k) > 0.5}`` equals the
label set exactly. Text accuracy is plain accuracy of the argmax.

Measured on the development machine (2 CPU cores shared with other jobs, torch 2.14.1, timm
1.0.31, transformers 5.23), ``python benchmarks/train_zoo.py`` (all entries):

RUNTIME_TABLE
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from captum_ext.data import SHAPE_CLASSES, TEXT_VOCAB, shapes, text_rationales
from captum_ext.zoo._build import build_model

__all__ = [
    "ENTRIES",
    "HELDOUT_SEED",
    "Entry",
    "evaluate",
    "fit",
    "image_loss",
    "main",
    "make_training_set",
    "set_accuracy",
    "text_loss",
    "train_entry",
]

HELDOUT_SEED = 424242
"""Seed of the held-out evaluation data (never a training seed; the tests use 987654)."""
HELDOUT_N = 2048
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "captum_ext" / "zoo" / "weights"
Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Phase:
    """One optimisation phase of an entry.

    Attributes:
        name: Short name recorded in the metadata.
        objective: ``"multilabel"`` (sigmoid/BCE on ``shapes``), ``"single"`` (softmax/CE on
            single-object ``shapes``, class = the one object) or ``"binary"`` (softmax/CE on
            ``text_rationales``).
        data_kwargs: Generator keyword arguments of this phase's training set.
        data_seed: Seed of the training set.
        n_train: Size of the training set.
        steps: Optimiser steps.
        batch_size: Examples per step.
        lr: Peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        linear_probe: Freeze everything but a freshly initialised classifier head and train
            the head on the backbone's (pre-computed) features.
        flip: Random horizontal flips (images only).
    """

    name: str
    objective: str
    data_kwargs: dict[str, Any]
    data_seed: int
    n_train: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    linear_probe: bool = False
    flip: bool = True


@dataclass(frozen=True)
class Entry:
    """A zoo entry: architecture, data, and its training phases.

    Attributes:
        name: Zoo name.
        family: ``"vit"``, ``"cnn"`` or ``"bert"``.
        library: ``"timm"`` or ``"transformers"``.
        arch: timm model name or ``"BertForSequenceClassification"``.
        model_kwargs: JSON-only keyword arguments that rebuild the architecture.
        modality: ``"image"`` or ``"text"``.
        task: ``"multilabel"`` or ``"binary"``.
        data_kwargs: Generator keyword arguments the final model is meant for.
        seed: ``torch.manual_seed`` for initialisation and batch order.
        phases: Optimisation phases, in order.
        notes: Free text recorded in the metadata.
    """

    name: str
    family: str
    library: str
    arch: str
    model_kwargs: dict[str, Any]
    modality: str
    task: str
    data_kwargs: dict[str, Any]
    seed: int
    phases: tuple[Phase, ...]
    notes: str = ""
    classes: tuple[str, ...] = field(default=SHAPE_CLASSES)


_ALIGNED = dict(layout="aligned", max_objects=2, size=32, patch=8)
_FREE = dict(layout="free", max_objects=2, size=32, patch=8)
_TEXT = dict(seq_len=16)
_VIT = dict(img_size=32, num_classes=len(SHAPE_CLASSES))

ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(
            name="shapes-vit",
            family="vit",
            library="timm",
            arch="vit_tiny_patch16_224",
            model_kwargs=dict(_VIT, patch_size=8, embed_dim=64, depth=4, num_heads=2),
            modality="image",
            task="multilabel",
            data_kwargs=_ALIGNED,
            seed=0,
            phases=(Phase("supervised", "multilabel", _ALIGNED, 1, 16384, 1200, 128, 2e-3),),
        ),
        Entry(
            name="shapes-vit-free",
            family="vit",
            library="timm",
            arch="vit_tiny_patch16_224",
            model_kwargs=dict(_VIT, patch_size=8, embed_dim=96, depth=6, num_heads=3),
            modality="image",
            task="multilabel",
            data_kwargs=_FREE,
            seed=0,
            phases=(Phase("supervised", "multilabel", _FREE, 2, 16384, 1500, 128, 2e-3),),
        ),
        Entry(
            name="shapes-vit-linear",
            family="vit",
            library="timm",
            arch="vit_tiny_patch16_224",
            model_kwargs=dict(_VIT, patch_size=8, embed_dim=64, depth=4, num_heads=2),
            modality="image",
            task="multilabel",
            data_kwargs=_ALIGNED,
            seed=0,
            phases=(
                Phase(
                    "backbone",
                    "single",
                    dict(_ALIGNED, max_objects=1),
                    3,
                    16384,
                    1000,
                    128,
                    2e-3,
                ),
                Phase(
                    "linear-probe",
                    "multilabel",
                    _ALIGNED,
                    4,
                    16384,
                    600,
                    1024,
                    1e-2,
                    weight_decay=0.0,
                    linear_probe=True,
                    flip=False,
                ),
            ),
            notes=(
                "CDAM paper setting: the backbone is trained on a related objective (4-way "
                "softmax classification of single-object images), then frozen; a freshly "
                "initialised linear head is trained on its pre-logit features for the "
                "multi-label task. Only the head saw two-object images."
            ),
        ),
        Entry(
            name="shapes-cnn",
            family="cnn",
            library="timm",
            arch="resnet18",
            model_kwargs=dict(
                num_classes=len(SHAPE_CLASSES), channels=[16, 32, 64, 128], stem_width=16
            ),
            modality="image",
            task="multilabel",
            data_kwargs=_ALIGNED,
            seed=0,
            phases=(Phase("supervised", "multilabel", _ALIGNED, 5, 16384, 800, 128, 3e-3),),
        ),
        Entry(
            name="text-bert",
            family="bert",
            library="transformers",
            arch="BertForSequenceClassification",
            model_kwargs=dict(
                vocab_size=len(TEXT_VOCAB),
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                max_position_embeddings=32,
                type_vocab_size=1,
                num_labels=2,
                pad_token_id=0,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            modality="text",
            task="binary",
            data_kwargs=_TEXT,
            seed=0,
            phases=(Phase("supervised", "binary", _TEXT, 6, 16384, 600, 128, 2e-3),),
            classes=("negative", "positive"),
        ),
    )
}


# --------------------------------------------------------------------------------------------
# data, losses, metrics


def make_training_set(phase: Phase, n: int | None = None) -> Batch:
    """The fixed training set of a phase as tensors.

    Args:
        phase: The phase; its ``objective``, ``data_kwargs``, ``data_seed`` and ``n_train``.
        n: Overrides ``phase.n_train`` (e.g. a tiny set in tests).

    Returns:
        ``(images (N, 3, H, W), labels (N, K))`` for ``"multilabel"``, ``(images, class (N,))``
        for ``"single"``, ``(input_ids (N, T), attention_mask (N, T), labels (N,))`` for
        ``"binary"``.
    """
    n = phase.n_train if n is None else n
    if phase.objective == "binary":
        b = text_rationales(n, phase.data_seed, **phase.data_kwargs)
        return b.input_ids, b.attention_mask, b.labels.long()
    b = shapes(n, phase.data_seed, **phase.data_kwargs)
    if phase.objective == "single":
        return b.images, b.labels.argmax(1)
    return b.images, b.labels


def image_loss(model: nn.Module, batch: Batch, objective: str) -> torch.Tensor:
    """BCE with logits (``"multilabel"``) or cross entropy (``"single"``) of an image batch."""
    x, y = batch
    logits = model(x)
    if objective == "single":
        return F.cross_entropy(logits, y)
    return F.binary_cross_entropy_with_logits(logits, y)


def text_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross entropy of a ``(input_ids, attention_mask, labels)`` batch."""
    ids, mask, y = batch
    return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)


def set_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose predicted set ``{k : sigmoid(logit_k) > 0.5}`` equals the labels."""
    return ((logits > 0) == (labels > 0.5)).all(dim=1).float().mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, entry: Entry, seed: int = HELDOUT_SEED, n: int = HELDOUT_N) -> float:
    """Held-out accuracy on ``n`` fresh examples generated with ``seed``.

    Set accuracy for image models, argmax accuracy for the text model.
    """
    model.eval()
    if entry.modality == "text":
        b = text_rationales(n, seed, **entry.data_kwargs)
        logits = torch.cat(
            [
                model(
                    input_ids=b.input_ids[i : i + 512], attention_mask=b.attention_mask[i : i + 512]
                ).logits
                for i in range(0, n, 512)
            ]
        )
        return (logits.argmax(1) == b.labels.long()).float().mean().item()
    b = shapes(n, seed, **entry.data_kwargs)
    logits = torch.cat([model(b.images[i : i + 512]) for i in range(0, n, 512)])
    return set_accuracy(logits, b.labels)


# --------------------------------------------------------------------------------------------
# optimisation


def fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    data: Batch,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    generator: torch.Generator,
    flip: bool = False,
    desc: str = "",
    progress: bool = True,
) -> list[float]:
    """AdamW with a one-cycle cosine schedule over a fixed training set.

    Batches are drawn epoch by epoch from seeded random permutations; with ``flip`` each
    image is mirrored left-right with probability 1/2 (all shape classes are mirror
    symmetric, and the aligned layout maps cells to cells).

    Args:
        model: The model, switched to train mode.
        params: The parameters to optimise.
        data: Tensors with the examples along dim 0.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        steps: Optimiser steps.
        batch_size: Examples per step (capped at the training set size).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        generator: Random source of the batch order and flips.
        flip: Random horizontal flips of ``data[0]`` (images ``(N, C, H, W)``).
        desc: Progress bar label.
        progress: Show a tqdm progress bar.

    Returns:
        The training loss of every step.
    """
    n = data[0].shape[0]
    batch_size = min(batch_size, n)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=0.1, anneal_strategy="cos"
    )
    model.train()
    losses: list[float] = []
    order = torch.randperm(n, generator=generator)
    pos = 0
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    for _ in bar:
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        batch = tuple(t[idx] for t in data)
        if flip:
            mirrored = torch.rand(len(idx), generator=generator) < 0.5
            x = batch[0].clone()
            x[mirrored] = x[mirrored].flip(-1)
            batch = (x, *batch[1:])
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    model.eval()
    return losses


class _Head(nn.Module):
    """The classifier head alone, applied to pre-computed pre-logit features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


@torch.no_grad()
def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pre-logit features ``(N, D)`` of a timm model."""
    model.eval()
    chunks = [
        model.forward_head(model.forward_features(images[i : i + 512]), pre_logits=True)
        for i in range(0, images.shape[0], 512)
    ]
    return torch.cat(chunks)


def run_phase(
    model: nn.Module,
    phase: Phase,
    generator: torch.Generator,
    *,
    n_train: int | None = None,
    steps: int | None = None,
    progress: bool = True,
    desc: str = "",
) -> list[float]:
    """Run one phase of an entry on ``model`` (in place).

    Args:
        model: The model being trained.
        phase: The phase.
        generator: Random source of the batch order and flips.
        n_train: Overrides the training set size (tests).
        steps: Overrides the number of steps (tests).
        progress: Show a progress bar.
        desc: Progress bar label.

    Returns:
        The training loss of every step.
    """
    data = make_training_set(phase, n_train)
    steps = phase.steps if steps is None else steps
    common = dict(
        steps=steps,
        batch_size=phase.batch_size,
        lr=phase.lr,
        weight_decay=phase.weight_decay,
        generator=generator,
        desc=desc,
        progress=progress,
    )
    if phase.objective == "binary":
        return fit(model, list(model.parameters()), data, text_loss, **common)
    if phase.linear_probe:
        # Freeze the backbone, re-initialise the head, train it on the frozen features.
        model.reset_classifier(len(SHAPE_CLASSES))
        for p in model.parameters():
            p.requires_grad_(False)
        head = _Head(model.get_classifier())
        for p in head.parameters():
            p.requires_grad_(True)
        feats = _features(model, data[0])
        losses = fit(
            head,
            list(head.parameters()),
            (feats, *data[1:]),
            lambda m, b: image_loss(m, b, phase.objective),
            **common,
        )
        for p in model.parameters():
            p.requires_grad_(True)
        return losses
    return fit(
        model,
        list(model.parameters()),
        data,
        lambda m, b: image_loss(m, b, phase.objective),
        flip=phase.flip,
        **common,
    )


def _phase_record(phase: Phase, seconds: float, losses: list[float]) -> dict[str, Any]:
    tail = losses[-50:]
    return {
        "name": phase.name,
        "objective": phase.objective,
        "trainable": "head only (backbone frozen, head re-initialised)"
        if phase.linear_probe
        else "all",
        "data": {"kwargs": phase.data_kwargs, "seed": phase.data_seed, "n_train": phase.n_train},
        "steps": phase.steps,
        "epochs": round(phase.steps * phase.batch_size / phase.n_train, 2),
        "batch_size": phase.batch_size,
        "optimizer": {"name": "AdamW", "lr": phase.lr, "weight_decay": phase.weight_decay},
        "schedule": {"name": "OneCycleLR", "pct_start": 0.1, "anneal_strategy": "cos"},
        "augmentation": "random horizontal flip"
        if phase.flip and phase.objective != "binary" and not phase.linear_probe
        else None,
        "final_loss": round(sum(tail) / len(tail), 5),
        "time_s": round(seconds, 1),
    }


def train_entry(entry: Entry, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train one entry from scratch and write its safetensors file and JSON record.

    Args:
        entry: The entry.
        out: Output folder.
        progress: Show progress bars.

    Returns:
        The JSON record written.
    """
    from safetensors.torch import save_file

    start = time.perf_counter()
    torch.manual_seed(entry.seed)
    record: dict[str, Any] = {
        "name": entry.name,
        "family": entry.family,
        "library": entry.library,
        "arch": entry.arch,
        "model_kwargs": entry.model_kwargs,
        "modality": entry.modality,
        "task": entry.task,
        "classes": list(entry.classes),
        "data": {
            "generator": "text_rationales" if entry.modality == "text" else "shapes",
            "kwargs": entry.data_kwargs,
        },
    }
    model = build_model(record)
    generator = torch.Generator().manual_seed(entry.seed)
    phases = []
    for i, phase in enumerate(entry.phases):
        t0 = time.perf_counter()
        desc = f"{entry.name} [{phase.name}]" if len(entry.phases) > 1 else entry.name
        losses = run_phase(model, phase, generator, progress=progress, desc=desc)
        phases.append(_phase_record(phase, time.perf_counter() - t0, losses))
        if i < len(entry.phases) - 1 and phase.objective == "single":
            phases[-1]["heldout_single_object_accuracy"] = _single_accuracy(model, phase)
    model.eval()
    accuracy = evaluate(model, entry)
    seconds = time.perf_counter() - start

    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{entry.name}.safetensors"
    save_file(state, str(weights), metadata={"name": entry.name, "format": "pt"})
    import timm
    import transformers

    record.update(
        {
            "params": sum(p.numel() for p in model.parameters()),
            "training": {
                "seed": entry.seed,
                "data_seeds": [p.data_seed for p in entry.phases],
                "steps": sum(p.steps for p in entry.phases),
                "phases": phases,
                "notes": entry.notes or None,
            },
            "heldout": {
                "seed": HELDOUT_SEED,
                "n": HELDOUT_N,
                "metric": "set_accuracy" if entry.modality == "image" else "accuracy",
                "accuracy": round(accuracy, 5),
            },
            "train_time_s": round(seconds, 1),
            "train_threads": torch.get_num_threads(),
            "command": f"python benchmarks/train_zoo.py --only {entry.name}",
            "versions": {
                "torch": torch.__version__,
                "timm": timm.__version__,
                "transformers": transformers.__version__,
            },
            "weights": {
                "file": weights.name,
                "dtype": "float32",
                "bytes": weights.stat().st_size,
                "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            },
        }
    )
    (out / f"{entry.name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


@torch.no_grad()
def _single_accuracy(model: nn.Module, phase: Phase) -> float:
    """Held-out argmax accuracy of a single-object classification phase."""
    model.eval()
    b = shapes(HELDOUT_N, HELDOUT_SEED, **phase.data_kwargs)
    logits = torch.cat([model(b.images[i : i + 512]) for i in range(0, HELDOUT_N, 512)])
    return round((logits.argmax(1) == b.labels.argmax(1)).float().mean().item(), 5)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 if an entry misses 95%)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(ENTRIES), help="train these entries only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    names = args.only or list(ENTRIES)
    rows = []
    for name in names:
        rec = train_entry(ENTRIES[name], args.out, progress=not args.no_progress)
        acc = rec["heldout"]["accuracy"]
        rows.append((name, rec["params"], acc, rec["train_time_s"], rec["weights"]["bytes"]))
        print(
            f"{name}: {rec['params']:,} params, held-out {rec['heldout']['metric']} {acc:.4f}, "
            f"{rec['train_time_s']:.0f} s, {rec['weights']['bytes'] / 1e6:.2f} MB",
            flush=True,
        )
    total = sum(r[3] for r in rows)
    print(f"total train time {total:.0f} s ({math.ceil(total / 60)} min)")
    failed = [r[0] for r in rows if r[2] < 0.95]
    if failed:
        print(f"below 0.95 held-out accuracy: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
