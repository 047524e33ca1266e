"""Train the model zoo (``captum_ext.zoo``) on the procedural benchmark data, on CPU.

    python benchmarks/training/train_zoo.py [--only NAME ...] [--out captum_ext/zoo/weights]

Every entry is seeded (``torch.manual_seed`` for initialisation and batch order, fixed data
seeds for the training sets), trained with AdamW and a one-cycle cosine schedule on a fixed
procedurally generated training set (random horizontal flips for images), evaluated on fresh
held-out data generated with a seed never used in training, and written with
:func:`captum_ext.checkpoint.save_checkpoint` as ``<name>.safetensors`` (float32 state dict, and
the record inside its metadata) plus ``<name>.json`` (architecture, data settings, recipe,
held-out accuracy, train time, the command that reproduces it, and the file's sha256 and tensor
shapes), which :func:`captum_ext.zoo.load` verifies on every read.

Image accuracy is *set accuracy*: the predicted set ``{k : sigmoid(logit_k) > 0.5}`` equals the
label set exactly. Text accuracy is plain accuracy of the argmax.

``--jobs N`` trains N entries at a time (one thread each). Two kinds of ViT are shipped, a conv
stem (shapes-vit, -free, -linear) and a plain patchifying one on data whose objects leave every
cell a rim of background (shapes-vit-plain), because a patchifying ViT on the standard data
misses squares that fill their cell exactly.

Measured accuracies, parameter counts, file sizes and run times, and the measurements behind
the two kinds of ViT: ``benchmarks/results/training.md`` (each entry's record holds its own).
"""

from __future__ import annotations

import argparse
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

from captum_ext.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
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
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "captum_ext" / "zoo" / "weights"
Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Phase:
    """One optimisation phase of an entry.

    Attributes:
        name: Short name recorded in the metadata.
        objective: ``"multilabel"`` (sigmoid/BCE on ``shapes``) or ``"binary"`` (softmax/CE
            on ``text_rationales``).
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
        classes: Class names, index = output index.
        init: Data-dependent initialisation applied before the first phase
            (``{"name": "patch-whitening", "eps", "n_images", "data_seed"}``), or None.
        backbone_from: Start from the trained weights of this entry (trained first when its
            file is missing from the output folder), or None.
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
    init: dict[str, Any] | None = None
    backbone_from: str | None = None


_ALIGNED = dict(layout="aligned", max_objects=2, size=32, patch=8)
_ALIGNED_RIM = dict(_ALIGNED, max_extent=7)
_FREE = dict(layout="free", max_objects=2, size=32, patch=8)
_TEXT = dict(seq_len=16)
_VIT = dict(img_size=32, patch_size=8, num_classes=len(SHAPE_CLASSES))
_STEM = dict(stem_chs=[16, 16, 32, 64], stem_strides=[1, 2, 2, 2])
_STEM_NOTE = (
    "Conv-stem ViT: a timm VisionTransformer whose patch embedding is a conv-BN-ReLU stem "
    "(strides 1, 2, 2, 2, then a 1x1 projection; Xiao et al. 2021); each token's receptive "
    "field is its 8x8 cell plus about 4 pixels around it."
)

ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(
            name="shapes-vit",
            family="vit",
            library="timm",
            arch="zoo_vit_convstem",
            model_kwargs=dict(_VIT, embed_dim=64, depth=4, num_heads=2, **_STEM),
            modality="image",
            task="multilabel",
            data_kwargs=_ALIGNED,
            seed=0,
            phases=(Phase("supervised", "multilabel", _ALIGNED, 1, 32768, 800, 128, 3e-3),),
            notes=_STEM_NOTE,
        ),
        Entry(
            name="shapes-vit-free",
            family="vit",
            library="timm",
            arch="zoo_vit_convstem",
            model_kwargs=dict(_VIT, embed_dim=64, depth=6, num_heads=2, **_STEM),
            modality="image",
            task="multilabel",
            data_kwargs=_FREE,
            seed=0,
            phases=(Phase("supervised", "multilabel", _FREE, 2, 32768, 1000, 128, 3e-3),),
            notes=_STEM_NOTE,
        ),
        Entry(
            name="shapes-vit-linear",
            family="vit",
            library="timm",
            arch="zoo_vit_convstem",
            model_kwargs=dict(_VIT, embed_dim=64, depth=4, num_heads=2, **_STEM),
            modality="image",
            task="multilabel",
            data_kwargs=_ALIGNED,
            seed=1,
            backbone_from="shapes-vit",
            phases=(
                Phase(
                    "linear-probe",
                    "multilabel",
                    _ALIGNED,
                    4,
                    16384,
                    500,
                    1024,
                    1e-2,
                    weight_decay=0.0,
                    linear_probe=True,
                    flip=False,
                ),
            ),
            notes=(
                "CDAM paper setting (frozen backbone + linear head): the backbone is "
                "shapes-vit's (trained end to end with its own head, phase 'backbone'), then "
                "frozen; the head is re-initialised and trained alone on the frozen pre-logit "
                "features (phase 'linear-probe')."
            ),
        ),
        Entry(
            name="shapes-vit-plain",
            family="vit",
            library="timm",
            arch="vit_tiny_patch16_224",
            model_kwargs=dict(_VIT, embed_dim=64, depth=4, num_heads=2, mlp_ratio=8.0),
            modality="image",
            task="multilabel",
            data_kwargs=_ALIGNED_RIM,
            seed=0,
            init={"name": "patch-whitening", "eps": 1e-3, "n_images": 4096, "data_seed": 7},
            phases=(Phase("supervised", "multilabel", _ALIGNED_RIM, 8, 32768, 3000, 128, 3e-3),),
            notes=(
                "Plain patchifying timm ViT (each token sees exactly its 8x8 cell), patch "
                "embedding initialised by PCA whitening of image patches; aligned layout with "
                "objects of extent 5..7 so that none fills its cell (max_extent=7)."
            ),
        ),
        Entry(
            name="shapes-cnn",
            family="cnn",
            library="timm",
            arch="zoo_resnet_s1",
            model_kwargs=dict(
                num_classes=len(SHAPE_CLASSES), layers=[1, 1, 1, 1], channels=[16, 32, 64, 128]
            ),
            modality="image",
            task="multilabel",
            data_kwargs=_ALIGNED,
            seed=0,
            phases=(Phase("supervised", "multilabel", _ALIGNED, 5, 16384, 500, 64, 3e-3),),
            notes="ResNet-10-style timm ResNet (BasicBlock) with a stride-1 stem for 32x32 input.",
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
            phases=(Phase("supervised", "binary", _TEXT, 6, 16384, 400, 128, 2e-3),),
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
        ``(images (N, 3, H, W), labels (N, K))`` for ``"multilabel"``,
        ``(input_ids (N, T), attention_mask (N, T), labels (N,))`` for ``"binary"``.
    """
    n = phase.n_train if n is None else n
    if phase.objective == "binary":
        b = text_rationales(n, phase.data_seed, **phase.data_kwargs)
        return b.input_ids, b.attention_mask, b.labels.long()
    b = shapes(n, phase.data_seed, **phase.data_kwargs)
    return b.images, b.labels


def image_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """BCE with logits of an ``(images, multi-hot labels)`` batch."""
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x), y)


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


@torch.no_grad()
def whiten_patch_embed(model: nn.Module, init: dict[str, Any], data_kwargs: dict[str, Any]) -> None:
    """Initialise a patchifying timm ViT's patch embedding by PCA whitening of image patches.

    The projection maps a flattened patch ``p`` (``3 * P * P`` values) to
    ``diag(1 / sqrt(lambda_d + eps)) V_d^T (p - mean)`` for the top ``embed_dim`` principal
    components ``V_d`` with variances ``lambda_d`` of the patches of ``init["n_images"]``
    images (seed ``init["data_seed"]``), so every token feature starts with unit variance and
    the low-variance (object) directions are not drowned by the background colour. Selected by
    ``Entry.init = {"name": "patch-whitening", "eps": 1e-3, "n_images": 4096, "data_seed": 7}``;
    no shipped entry uses it (they have conv stems), but a plain patchifying ViT does not leave
    its initial loss plateau without it (``benchmarks/results/training.md``).

    Args:
        model: A timm ``VisionTransformer`` with a ``Conv2d`` patch projection.
        init: ``{"eps", "n_images", "data_seed"}``.
        data_kwargs: Keyword arguments of :func:`captum_ext.data.shapes`.
    """
    proj = model.patch_embed.proj
    p = proj.kernel_size[0]
    images = shapes(init["n_images"], init["data_seed"], **data_kwargs).images
    patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)
    patches = patches.reshape(-1, images.shape[1] * p * p).double()
    mean = patches.mean(0)
    cov = torch.cov((patches - mean).T)
    lam, vec = torch.linalg.eigh(cov)  # ascending
    d = proj.out_channels
    lam, vec = lam.flip(0)[:d], vec.flip(1)[:, :d]
    w = (vec / (lam + init["eps"]).sqrt()).T
    proj.weight.copy_(w.reshape(proj.weight.shape).float())
    proj.bias.copy_((-(w @ mean)).float())


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
            image_loss,
            **common,
        )
        for p in model.parameters():
            p.requires_grad_(True)
        return losses
    return fit(
        model,
        list(model.parameters()),
        data,
        image_loss,
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
    """Train one entry from scratch and write its checkpoint (safetensors file + JSON record).

    Args:
        entry: The entry.
        out: Output folder.
        progress: Show progress bars.

    Returns:
        The JSON record written (with its ``weights`` section: file, bytes, sha256, tensors).
    """
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
    phases: list[dict[str, Any]] = []
    if entry.init is not None:
        whiten_patch_embed(model, entry.init, entry.data_kwargs)
    if entry.backbone_from is not None:
        phases.append(_load_backbone(model, entry.backbone_from, out, progress))
    for phase in entry.phases:
        t0 = time.perf_counter()
        desc = f"{entry.name} [{phase.name}]" if entry.backbone_from else entry.name
        losses = run_phase(model, phase, generator, progress=progress, desc=desc)
        phases.append(_phase_record(phase, time.perf_counter() - t0, losses))
    model.eval()
    accuracy = evaluate(model, entry)
    seconds = time.perf_counter() - start

    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    import timm
    import transformers

    record.update(
        {
            "params": sum(p.numel() for p in model.parameters()),
            "training": {
                "seed": entry.seed,
                "data_seeds": sorted(
                    {p.data_seed for p in entry.phases}
                    | {d for ph in phases for d in ph.get("data_seeds", [])}
                    | ({entry.init["data_seed"]} if entry.init else set())
                ),
                "init": entry.init,
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
            "command": f"python benchmarks/training/train_zoo.py --only {entry.name}",
            "versions": {
                "torch": torch.__version__,
                "timm": timm.__version__,
                "transformers": transformers.__version__,
            },
        }
    )
    paths = save_checkpoint(out / entry.name, state, record)
    return verify_checkpoint(paths.record, expect={"name": entry.name})


def _load_backbone(model: nn.Module, source: str, out: Path, progress: bool) -> dict[str, Any]:
    """Load the trained weights of entry ``source`` (training it first if missing), verified."""
    if not all(p.is_file() for p in checkpoint_paths(out / source)):
        train_entry(ENTRIES[source], out, progress=progress)
    state, src = load_checkpoint(out / source, expect={"name": source})
    model.load_state_dict(state, strict=True)
    return {
        "name": "backbone",
        "source": source,
        "source_sha256": src["weights"]["sha256"],
        "objective": src["task"],
        "trainable": "all (end to end with its own head, which is then discarded)",
        "data": src["training"]["phases"][-1]["data"],
        "steps": src["training"]["steps"],
        "init": src["training"].get("init"),
        "data_seeds": src["training"]["data_seeds"],
        "source_heldout_accuracy": src["heldout"]["accuracy"],
        "time_s": src["train_time_s"],
    }


def _train_in_worker(name: str, out: Path, progress: bool, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return train_entry(ENTRIES[name], out, progress=progress)


def _train_all(names: list[str], out: Path, progress: bool, jobs: int) -> list[dict[str, Any]]:
    """Train ``names``, ``jobs`` processes at a time (an entry waits for its backbone)."""
    if jobs <= 1:
        return [train_entry(ENTRIES[n], out, progress=progress) for n in names]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    records: dict[str, dict[str, Any]] = {}
    waiting = [n for n in names if ENTRIES[n].backbone_from in names]
    ready = [n for n in names if n not in waiting]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        running = {pool.submit(_train_in_worker, n, out, progress, threads): n for n in ready}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                records[running.pop(fut)] = fut.result()
            for n in [n for n in waiting if ENTRIES[n].backbone_from in records]:
                waiting.remove(n)
                running[pool.submit(_train_in_worker, n, out, progress, threads)] = n
    return [records[n] for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 if an entry misses 95%)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(ENTRIES), help="train these entries only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many entries at once, each in its own process with "
        "cpu_count // jobs threads (the small models use one core poorly in two threads)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    names = args.only or list(ENTRIES)
    start = time.perf_counter()
    records = _train_all(names, args.out, not args.no_progress, args.jobs)
    for rec in records:
        print(
            f"{rec['name']}: {rec['params']:,} params, held-out {rec['heldout']['metric']} "
            f"{rec['heldout']['accuracy']:.4f}, {rec['train_time_s']:.0f} s, "
            f"{rec['weights']['bytes'] / 1e6:.2f} MB"
        )
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min), jobs={args.jobs}")
    failed = [r["name"] for r in records if r["heldout"]["accuracy"] < 0.95]
    if failed:
        print(f"below 0.95 held-out accuracy: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
