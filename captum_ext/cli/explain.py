"""``captum-ext explain``: maps of one method for local images or texts, written to a folder.

Per image and target class: ``NAME_METHOD_classK.png`` (Captum's ``blended_heat_map``
overlay, 400 x 400 pixels) and ``NAME_METHOD_classK.npy`` (the map ``(H, W)`` in the
model's input space, float32). Per text: ``text.html`` (Captum's ``visualize_text``),
``text.png`` and ``textI_METHOD_classK.npy`` (token scores ``(T,)``). Always:
``attributions.safetensors`` (every map, keyed ``NAME/METHOD/classK``) and
``prediction.json`` (top classes with scores, targets, files, preprocessing).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captum_ext.cli._common import (
    CLIError,
    TextRow,
    add_device,
    check_methods,
    check_out_dir,
    first_line,
    resolve_device,
    save_overlay,
    staged_output,
    text_figure,
    write_json,
)
from captum_ext.models import LoadedModel, load

__all__ = ["add_parser", "run"]

TOP_K = 5

EPILOG = """\
model specs:
  timm:ARCH   a timm architecture; weights from --weights FILE (never downloaded)
  hf:DIR      a HuggingFace folder written by save_pretrained (image or text classifier;
              text models use the tokenizer saved in DIR)
  zoo:NAME    a model shipped with captum_ext (see `captum-ext evaluate --help`)

examples:
  captum-ext explain --model timm:vit_small_patch16_224 --weights vit_s16.safetensors \\
      --image cat.png dog.jpg --method cdam --target 281 285
  captum-ext explain --model timm:vit_tiny_patch16_224 --weights tiny.safetensors \\
      --model-kwargs '{"img_size": 32, "patch_size": 8}' --image x.png --method tam
  captum-ext explain --model hf:./my-vit --image x.png --method relevance
  captum-ext explain --model hf:./my-bert --text "a great movie" --method cdam --target 1
  captum-ext explain --model zoo:shapes-vit --image shapes.png --method cdam --target circle

writes, per input and target: NAME_METHOD_classK.png (Captum blended_heat_map overlay,
400x400 px) and NAME_METHOD_classK.npy (the map in input space); for texts text.html,
text.png and token-score .npy files; always attributions.safetensors (every map) and
prediction.json (top classes and scores: softmax, or sigmoid for multi-label models).
Weights: .safetensors preferred; .pt/.pth/.bin are read with torch.load(weights_only=True).
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``explain`` subcommand to ``sub``."""
    p = sub.add_parser(
        "explain",
        help="explain your own model on local images or texts",
        description="Explain a timm, HuggingFace or zoo model on local images or texts "
        "with one or more methods.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="SPEC", help="timm:ARCH, hf:DIR or zoo:NAME")
    p.add_argument("--weights", metavar="PATH", help="weights file (.safetensors preferred)")
    p.add_argument(
        "--model-kwargs", metavar="JSON", help="timm.create_model keyword arguments, as JSON"
    )
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", nargs="+", metavar="IMG", help="image files (read with PIL)")
    inputs.add_argument("--text", nargs="+", metavar="TEXT", help="texts to classify and explain")
    p.add_argument(
        "--method",
        nargs="+",
        required=True,
        metavar="NAME",
        help="cdam, tam, relevance, rollout, attention_map (one or more)",
    )
    p.add_argument(
        "--target",
        nargs="+",
        metavar="K",
        help="class indices or names to explain (default: the top class of each input)",
    )
    p.add_argument(
        "--out", default="captum-ext-explain", help="output folder (default: %(default)s)"
    )
    add_device(p)
    return p


@dataclass
class _Item:
    """One input with its prediction and maps."""

    name: str
    source: str
    probs: torch.Tensor  # (C,)
    top: list[dict[str, Any]]
    targets: list[int]
    maps: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    display: torch.Tensor | None = None  # images: (3, H, W) in [0, 1]
    tokens: list[str] | None = None  # texts


def _check_images(paths: list[str]) -> list[Path]:
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise CLIError(f"--image {p}: no such file")
        try:
            with Image.open(p) as img:
                img.verify()
        except (UnidentifiedImageError, OSError) as err:
            raise CLIError(f"--image {p}: not an image PIL can read ({first_line(err)})") from err
        out.append(p)
    return out


def _parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(f"--model-kwargs is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise CLIError("--model-kwargs must be a JSON object, e.g. '{\"img_size\": 32}'")
    return value


def _parse_targets(values: list[str] | None, names: list[str]) -> list[int] | None:
    if not values:
        return None
    lower = {n.lower(): i for i, n in enumerate(names)}
    out = []
    for v in values:
        if re.fullmatch(r"-?\d+", v):
            k = int(v)
            if not 0 <= k < len(names):
                raise CLIError(f"--target {k} is out of range: the model has {len(names)} classes")
        elif v.lower() in lower:
            k = lower[v.lower()]
        else:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise CLIError(f"--target {v!r} is neither a class index nor a class name ({shown})")
        out.append(k)
    return list(dict.fromkeys(out))


def _unique_names(stems: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for stem in stems:
        base = re.sub(r"[^\w.-]+", "_", stem) or "input"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def _top(loaded: LoadedModel, probs: torch.Tensor) -> list[dict[str, Any]]:
    values, idx = probs.topk(min(TOP_K, probs.numel()))
    return [
        {"class": int(i), "label": loaded.class_names[int(i)], "score": round(float(v), 6)}
        for v, i in zip(values, idx)
    ]


def _attribute(explainer: Any, method: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    from captum_ext.errors import MissingAttentionError, UnsupportedModelError

    try:
        return explainer.attribute(*args, **kwargs).detach().float().cpu()
    except (ValueError, UnsupportedModelError, MissingAttentionError) as err:
        raise CLIError(f"{method}: {first_line(err)}") from err


def _explainers(methods: list[str], loaded: LoadedModel) -> dict[str, Any]:
    from captum_ext.errors import UnsupportedModelError
    from captum_ext.registry import make_method

    out = {}
    for m in methods:
        try:
            out[m] = make_method(m, loaded.model)
        except (UnsupportedModelError, ValueError) as err:
            raise CLIError(f"{m} on {loaded.spec}: {first_line(err)}") from err
    return out


def _explain_images(
    loaded: LoadedModel, paths: list[Path], methods: list[str], targets: list[int] | None
) -> list[_Item]:
    from PIL import Image

    explainers = _explainers(methods, loaded)
    items = []
    for name, path in zip(_unique_names([p.stem for p in paths]), paths):
        with Image.open(path) as img:
            x = loaded.image_transform(img)[None].to(loaded.device)
        probs = loaded.probabilities(loaded.logits(x))[0].cpu()
        item = _Item(name, str(path), probs, _top(loaded, probs), targets or [int(probs.argmax())])
        item.display = loaded.display(x[0]).cpu()
        for m in methods:
            for k in item.targets:
                item.maps[m, k] = _attribute(explainers[m], m, x, target=k)[0]  # (1, H, W)
        items.append(item)
    return items


def _explain_texts(
    loaded: LoadedModel, texts: list[str], methods: list[str], targets: list[int] | None
) -> list[_Item]:
    explainers = _explainers(methods, loaded)
    items = []
    for i, text in enumerate(texts):
        enc = loaded.tokenize(text)
        ids, mask = enc.input_ids.to(loaded.device), enc.attention_mask.to(loaded.device)
        probs = loaded.probabilities(loaded.logits(ids, mask))[0].cpu()
        item = _Item(f"text{i}", text, probs, _top(loaded, probs), targets or [int(probs.argmax())])
        item.tokens = enc.tokens
        for m in methods:
            for k in item.targets:
                item.maps[m, k] = _attribute(
                    explainers[m], m, ids, target=k, additional_forward_args=(mask,)
                )[0]  # (T,)
        items.append(item)
    return items


def _write(
    out: Path, loaded: LoadedModel, items: list[_Item], methods: list[str], device: str
) -> list[Path]:
    from safetensors.torch import save_file

    from captum_ext.registry import METHODS
    from captum_ext.viz import html_text, text_record

    tensors: dict[str, torch.Tensor] = {}
    records, rows, entries = [], [], []
    for item in items:
        files = []
        for (m, k), attr in item.maps.items():
            spec = METHODS[m]
            stem = f"{item.name}_{m}_class{k}"
            tensors[f"{item.name}/{m}/class{k}"] = attr.contiguous()
            raw = attr[0] if item.display is not None else attr  # (H, W) or (T,)
            np.save(out / f"{stem}.npy", raw.numpy().astype(np.float32))
            files.append(f"{stem}.npy")
            label = f"{loaded.class_names[k]} (p={float(item.probs[k]):.3f})"
            if item.display is not None:
                title = f"{spec.label}: {label}"
                save_overlay(out / f"{stem}.png", attr, item.display, spec.signed, title)
                files.append(f"{stem}.png")
            else:
                pred = item.top[0]
                records.append(
                    text_record(
                        attr,
                        item.tokens,
                        pred["score"],
                        pred["label"],
                        "n/a",
                        f"{loaded.class_names[k]} ({spec.label})",
                    )
                )
                rows.append(
                    TextRow(f"{item.name} {spec.label} {label}", item.tokens, attr, spec.signed)
                )
        entries.append(
            {
                "name": item.name,
                "input": item.source,
                **({"tokens": item.tokens} if item.tokens is not None else {}),
                "top": item.top,
                "targets": [
                    {"class": k, "label": loaded.class_names[k], "score": float(item.probs[k])}
                    for k in item.targets
                ],
                "files": files,
            }
        )
    if records:
        (out / "text.html").write_text(html_text(records))
        fig = text_figure(rows, title=f"{loaded.spec}", note=_colour_note(methods))
        fig.savefig(out / "text.png", dpi=100)
    save_file(tensors, str(out / "attributions.safetensors"), metadata={"model": loaded.spec})
    write_json(
        out / "prediction.json",
        {
            "model": loaded.spec,
            "device": device,
            "score": "sigmoid (multi-label)" if loaded.multi_label else "softmax",
            "methods": {
                m: {"label": METHODS[m].label, "signed": METHODS[m].signed} for m in methods
            },
            "preprocessing": loaded.preprocessing,
            "notes": loaded.notes,
            "inputs": entries,
        },
    )
    return sorted(p.relative_to(out) for p in out.iterdir())


def _colour_note(methods: list[str]) -> str:
    from captum_ext.registry import METHODS

    signed = [METHODS[m].label for m in methods if METHODS[m].signed]
    note = "each row scaled by its own max |score|"
    if signed:
        note += f"; {', '.join(signed)}: red = evidence for the class, blue = against"
    return note


def run(args: argparse.Namespace) -> int:
    """Runs ``captum-ext explain`` (see the module docstring for the outputs)."""
    methods = check_methods(args.method)
    device = resolve_device(args.device)
    out = Path(args.out)
    check_out_dir(out)
    images = _check_images(args.image) if args.image else None
    weights = Path(args.weights) if args.weights else None
    if weights is not None and not weights.is_file():
        raise CLIError(f"--weights {weights}: no such file")
    loaded = load(args.model, weights, device, model_kwargs=_parse_kwargs(args.model_kwargs))
    wanted = "image" if images else "text"
    if loaded.modality != wanted:
        use = "an image model; use --image FILE" if wanted == "text" else "a text model; use --text"
        raise CLIError(f"{loaded.spec} is {use}")
    targets = _parse_targets(args.target, loaded.class_names)
    for note in loaded.notes:
        print(f"note: {note}")
    if images:
        items = _explain_images(loaded, images, methods, targets)
    else:
        items = _explain_texts(loaded, args.text, methods, targets)
    with staged_output(out) as tmp:
        files = _write(tmp, loaded, items, methods, device)
    for item in items:
        best = item.top[0]
        print(f"{item.name}: top class {best['class']} {best['label']!r} ({best['score']:.3f})")
    print(
        f"wrote {len(files)} files to {out}/: "
        + ", ".join(map(str, files[:6]))
        + (", ..." if len(files) > 6 else "")
    )
    return 0
