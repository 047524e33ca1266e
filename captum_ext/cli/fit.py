"""``captum-ext fit``: trains T-TAME or MHEX for a model on a folder of images.

``captum-ext fit ttame|mhex --model SPEC --data DIR --out PATH`` loads the model as
``explain`` does (``timm:ARCH --weights FILE``, ``hf:DIR``, ``zoo:NAME``), reads the folder
with the model's preprocessing (a plain folder of images, or an ``ImageFolder`` tree with one
sub-folder per class), trains the explainer with ``fit`` and writes what ``save`` writes:
``PATH.safetensors`` + ``PATH.json``, which ``TTAME.load(PATH, model)`` /
``MHEX.load(PATH, model)`` (and ``captum-ext explain --explainer PATH``) read back.

T-TAME trains on the model's own top-1 predictions: any folder will do, labels are ignored.
MHEX trains on labels: it needs an ``ImageFolder`` tree (a plain folder is refused), unless
``--targets predictions`` trains it on the model's own predictions as T-TAME trains.

The training options are the flags: every keyword argument of ``TTAME.fit`` / ``MHEX.fit``
and every field of ``TrainingRecipe`` (:mod:`captum_ext.cli._fit_options` reads them from
the source, so the two never differ); an option not given keeps its Python default.
Epoch checkpoints (``--checkpoint-dir``, ``--keep-checkpoints``) and ``--resume`` are the
recipe's. Under ``torchrun`` the processes train together (DDP, ``--batch-size`` is the
global batch) and only rank 0 writes.

Everything that can be checked is checked before training: the output can be written (and
does not exist, unless ``--overwrite``), the options are valid, every image decodes, the
weights fit the model, the folder has the labels the explainer needs. The pair is written
into a temporary folder beside ``PATH`` and moved into place at the end: an error or an
interrupt leaves no half-written output.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_ext.cli._common import (
    ZOO_MODELS,
    CLIError,
    HelpFormatter,
    _sigterm_raises,
    add_device,
    add_quiet,
    check_out_dir,
    first_line,
    is_main_process,
    open_dataset,
    resolve_device,
    staged_output,
)
from captum_ext.cli._fit_options import EXPLAINERS, add_options, chosen, options, to_flags

if TYPE_CHECKING:
    from captum_ext.models import LoadedModel

__all__ = ["add_parser", "run"]

_MODELS = f"""\
model specs:
  timm:ARCH   a timm architecture; weights from --weights FILE (never downloaded)
  hf:DIR      a HuggingFace image classifier folder written by save_pretrained
  zoo:NAME    a model shipped with captum_ext (captum_ext.zoo):
              {ZOO_MODELS}
"""

_DATA = """\
data (--data DIR, read with the model's preprocessing; every image is decoded first):
  ttame   trains on the model's own top-1 predictions: a folder of images, or an
          ImageFolder tree (its labels are ignored)
  mhex    trains on labels: an ImageFolder tree, one sub-folder per class, named as the
          model's classes (or as many sub-folders as classes, in order); with
          --targets predictions on the model's own predictions, any folder (as ttame)
"""

_WRITES = """\
writes PATH.safetensors + PATH.json (what TTAME.save / MHEX.save write), read by
`captum-ext explain --model SPEC --explainer PATH` and by TTAME.load(PATH, model) /
MHEX.load(PATH, model); an existing PATH is refused unless --overwrite. Options not given
keep the Python defaults of TrainingRecipe and EXPLAINER.fit; --seed also seeds the
explainer's initial weights, so a run is repeatable. --checkpoint-dir DIR writes
DIR/epoch-NNN.safetensors + .json after every epoch; --resume continues from the newest
one (with the same options). Under torchrun only rank 0 writes.
"""

EPILOG = f"""\
{_MODELS}
{_DATA}
examples:
  captum-ext fit ttame --model timm:resnet50 --weights resnet50.safetensors \\
      --data photos/ --out resnet50-ttame
  captum-ext fit ttame --model zoo:shapes-cnn --data images/ --epochs 2 --batch-size 16 \\
      --checkpoint-dir ckpt/ --out shapes-cnn-ttame
  captum-ext fit ttame --model zoo:shapes-cnn --data images/ --epochs 2 --batch-size 16 \\
      --checkpoint-dir ckpt/ --resume --out shapes-cnn-ttame    # after an interruption
  captum-ext fit mhex --model hf:./my-vit --data train/ --objective ce --out my-vit-mhex
  captum-ext fit mhex --model timm:resnet50 --weights resnet50.safetensors \
      --data photos/ --targets predictions --out resnet50-mhex
  torchrun --nproc_per_node 8 -m captum_ext.cli fit ttame --model timm:vit_small_patch16_224 \\
      --weights vit_s16.safetensors --data train/ --device cuda --out vit-ttame
  captum-ext explain --model zoo:shapes-cnn --explainer shapes-cnn-ttame --image x.png

{_WRITES}
run `captum-ext fit ttame --help` / `captum-ext fit mhex --help` for every training option.
"""

_DESCRIPTIONS = {
    "ttame": "Train T-TAME (a trained attention mechanism over three feature layers) for a "
    "CNN or ViT on a folder of images; no labels needed.",
    "mhex": "Train MHEX (attention gates and deep-supervision heads built into the model) "
    "for a ResNet-style CNN or a ViT on an ImageFolder tree (labels needed).",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``fit`` subcommand (``fit ttame``, ``fit mhex``) to ``sub``."""
    p = sub.add_parser(
        "fit",
        help="train T-TAME or MHEX for your model on a folder of images",
        description="Train a trainable explainer (T-TAME or MHEX) for a timm, HuggingFace or "
        "zoo image model on a folder of images, and write it for `explain --explainer`.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    inner = p.add_subparsers(
        dest="explainer", metavar="EXPLAINER", required=True, parser_class=type(p)
    )
    for name in EXPLAINERS:
        q = inner.add_parser(
            name,
            help=_DESCRIPTIONS[name],
            description=_DESCRIPTIONS[name],
            epilog=f"{_MODELS}\n{_DATA}\n{_WRITES}",
            formatter_class=HelpFormatter,
        )
        _add_common(q)
        add_options(q, name)
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="SPEC", help="timm:ARCH, hf:DIR or zoo:NAME")
    p.add_argument("--weights", metavar="PATH", help="weights file (.safetensors preferred)")
    p.add_argument(
        "--model-kwargs", metavar="JSON", help="timm.create_model keyword arguments, as JSON"
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="class names for a custom head: one per line, or a JSON list",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="training images: a folder of images or an ImageFolder tree (see below)",
    )
    p.add_argument(
        "--val-data",
        metavar="DIR",
        help="images scored after every epoch, read as --data (T-TAME: Average Drop / "
        "Increase in Confidence; MHEX: accuracy of every head)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="writes PATH.safetensors and PATH.json (a .safetensors/.json suffix is dropped)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing PATH.safetensors/.json"
    )
    add_device(p)
    add_quiet(p)


# --- the data ---------------------------------------------------------------------------------


@functools.cache
def _examples_class() -> type:
    """A ``Dataset`` of a folder's ``(image, label, None)`` items as ``fit`` takes them:
    images only (``labels="none"``), ``(image, class index)`` (``"index"``) or ``(image,
    one-hot (K,) float)`` (``"onehot"``). Built on first use, so that torch is imported
    after parsing; instances pickle through :func:`_examples` (DataLoader workers)."""
    import torch
    from torch.utils.data import Dataset

    class Examples(Dataset):
        def __init__(self, data: Any, labels: str, num_classes: int) -> None:
            self.data, self.labels, self.num_classes = data, labels, num_classes

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, index: int) -> Any:
            image, label, _ = self.data[index]
            if self.labels == "none":
                return image
            if self.labels == "index":
                return image, int(label)
            onehot = torch.zeros(self.num_classes, dtype=image.dtype)
            onehot[int(label)] = 1
            return image, onehot

        def __reduce__(self) -> Any:
            return _examples, (self.data, self.labels, self.num_classes)

    return Examples


def _examples(data: Any, labels: str, num_classes: int) -> Any:
    return _examples_class()(data, labels, num_classes)


def _folder(flag: str, source: str, loaded: LoadedModel, explainer: str, labels: str) -> Any:
    """The images of ``flag``'s folder as ``fit`` takes them (see :func:`_examples_class`).

    Raises:
        CLIError: Not a folder, no images, an unreadable image, class folders that do not
            match the model's classes, or (MHEX) a folder without class sub-folders.
    """
    if not Path(source).is_dir():
        raise CLIError(f"{flag} {source}: no such folder; give a folder of images or an "
                       "ImageFolder tree (one sub-folder per class)")  # fmt: skip
    try:  # "./shapes": a folder named shapes, not the benchmark open_dataset calls "shapes"
        data = open_dataset(
            source if source != "shapes" else "./shapes",
            loaded,
            0,
            0,
            match_classes=labels != "none",
        )
    except CLIError as err:
        raise CLIError(str(err).replace("--dataset", flag, 1)) from err
    if labels != "none" and data.layout != "imagefolder":
        raise CLIError(
            f"{flag} {source}: {EXPLAINERS[explainer][1]} trains on labels and this folder "
            "has none (its images are at the top level); give an ImageFolder tree, one "
            "sub-folder of images per class, or train on the model's own predictions with "
            "--targets predictions"
        )
    return _examples(data, labels, len(loaded.class_names))


# --- the command ------------------------------------------------------------------------------


def _out_paths(out: str, overwrite: bool) -> tuple[Path, Path]:
    """``(PATH.safetensors, PATH.json)``, checked: writable, and absent unless ``overwrite``."""
    base = Path(out)
    if not base.name or base.name in (".", ".."):
        raise CLIError(f"--out {out}: names no file; give a base path such as runs/my-ttame")
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    pair = (base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json"))
    for path in pair:
        if path.is_dir():
            raise CLIError(f"--out {out}: {path} is a folder")
        if path.exists() and not overwrite:
            raise CLIError(
                f"--out {out}: {path} exists; pass --overwrite to replace it, or choose "
                "another --out"
            )
    folder = base.parent
    try:
        if folder.is_dir():  # the pair is staged in the folder itself (see _write_pair)
            os.rmdir(tempfile.mkdtemp(prefix=".captum-ext-", dir=folder))
        else:
            check_out_dir(folder, "new")
    except CLIError as err:
        raise CLIError(str(err).replace(f"--out {folder}", f"--out {out}", 1)) from err
    except OSError as err:
        raise CLIError(
            f"--out {out}: cannot write in {folder} ({err.strerror or first_line(err)})"
        ) from err
    return pair


def _write_pair(explainer: Any, pair: tuple[Path, Path], extra: dict[str, Any]) -> None:
    """``explainer.save`` into a temporary folder, then both files moved into place.

    In an existing folder the temporary folder sits inside it (a rename each, and no
    need to write in its parent); a folder that does not exist yet is made by
    :func:`staged_output`. An error or SIGTERM before the move leaves neither file.
    """
    safetensors, record = pair
    folder = safetensors.parent
    if not folder.is_dir():
        with staged_output(folder, "new") as tmp:
            explainer.save(tmp / safetensors.stem, extra=extra)
        return
    with _sigterm_raises() as sigterm:
        tmp = Path(tempfile.mkdtemp(prefix=".captum-ext-", dir=folder))
        try:
            written = explainer.save(tmp / safetensors.stem, extra=extra)
            sigterm["defer"] = True  # the two renames are not interrupted half-way
            os.replace(written.weights, safetensors)
            os.replace(written.record, record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_checkpoint_dir(recipe_kwargs: dict[str, Any]) -> None:
    folder = recipe_kwargs.get("checkpoint_dir")
    if folder is None:
        return
    try:
        check_out_dir(Path(folder), "merge")
    except CLIError as err:
        raise CLIError(str(err).replace("--out", "--checkpoint-dir", 1)) from err


def _make(explainer: str, loaded: LoadedModel) -> Any:
    from captum_ext.explainers import MHEX, TTAME

    try:
        if explainer == "ttame":
            return TTAME(loaded.model, input_size=loaded.input_size)
        return MHEX(loaded.model)
    except ValueError as err:
        raise CLIError(f"{EXPLAINERS[explainer][1]} on {loaded.spec}: {first_line(err)}") from err


def run(args: argparse.Namespace) -> int:
    """Runs ``captum-ext fit EXPLAINER`` (see the module docstring)."""
    import torch

    from captum_ext.cli.explain import _load_model
    from captum_ext.distributed import local_device
    from captum_ext.explainers import TrainingRecipe

    name = args.explainer
    recipe_kwargs = chosen(args, name, "recipe")
    fit_kwargs = chosen(args, name, "fit")
    device = str(local_device(resolve_device(args.device)))
    try:
        recipe = TrainingRecipe(**recipe_kwargs, show_progress=not args.quiet)
    except ValueError as err:
        raise CLIError(to_flags(first_line(err), name)) from err
    pair = _out_paths(args.out, args.overwrite)
    _check_checkpoint_dir(recipe_kwargs)
    main = is_main_process()
    loaded = _load_model(args, device)
    if loaded.modality != "image":
        raise CLIError(f"{loaded.spec} is a text model; fit trains on folders of images")
    if main:
        for note in loaded.notes:
            print(f"note: {note}")
    labels = "none"
    if name == "mhex":
        default = next(o.default for o in options(name) if o.name == "objective")
        objective = fit_kwargs.get("objective", default)
        targets = fit_kwargs.get(
            "targets", next(o.default for o in options(name) if o.name == "targets")
        )
        if targets == "labels":
            labels = "onehot" if objective == "bce" else "index"
        if loaded.multi_label and objective == "ce" and main:
            print(f"note: {loaded.spec} scores classes with sigmoids (multi-label); "
                  "--objective bce trains the heads the same way")  # fmt: skip
    data = _folder("--data", args.data, loaded, name, labels)
    val = _folder("--val-data", args.val_data, loaded, name, labels) if args.val_data else None
    torch.manual_seed(recipe.seed)  # the explainer's initial weights: a run is repeatable
    explainer = _make(name, loaded)
    try:
        history = explainer.fit(data, recipe, val_data=val, **fit_kwargs)
    except (ValueError, FloatingPointError) as err:
        raise CLIError(to_flags(first_line(err), name)) from err
    if not main:
        return 0
    final = recipe.with_defaults(explainer.default_recipe)
    extra = {
        "fit_command": {
            "explainer": name,
            "model": loaded.spec,
            "weights": Path(args.weights).name if args.weights else None,
            "data": data.data.describe(),
            "recipe": {
                o.name: getattr(final, o.name)
                if o.kind != "path" or getattr(final, o.name) is None
                else str(getattr(final, o.name))
                for o in options(name)
                if o.owner == "recipe"
            },
            "options": fit_kwargs,
            "history": history,
        }
    }
    _write_pair(explainer, pair, extra)
    safetensors, record = pair
    last = history[-1] if history else {}
    loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
    print(
        f"fitted {EXPLAINERS[name][1]} on {len(data)} images of {args.data} for {loaded.spec} "
        f"({final.epochs} epoch{'s' if final.epochs != 1 else ''}{loss}): wrote {safetensors} "
        f"and {record}"
    )
    return 0
