"""``captum-ext explain``: maps of one or more methods for local images or texts.

Per image and target class: ``NAME_METHOD_classK.png`` (the map over the greyscale image
as Captum's ``blended_heat_map`` draws it, in :mod:`captum_ext.viz`'s colours: green = for
the class, red = against, white = 0; 400 x 400 pixels, with a colour bar) and
``NAME_METHOD_classK.npy`` (the map ``(H, W)`` in the model's input space, float32). Per
text: ``text.html`` (Captum's ``visualize_text``), ``text.png`` and
``textI_METHOD_classK.npy`` (token scores ``(T,)``). Always:
``attributions.safetensors`` (every map, keyed ``NAME/METHOD/classK``) and
``prediction.json`` (top classes with scores, targets, files, preprocessing).

With ``--dataset`` (``shapes``, a folder of images or an ``ImageFolder`` tree) the whole
dataset is explained, in one process or under ``torchrun`` (one share of the chunks per
process), into resumable shards: ``shard-CCCCC.safetensors`` + ``.json`` per chunk of
``--chunk-size`` examples and one ``index.json`` (see
:func:`captum_ext.evaluation.explain_dataset`); no figures. Running it again on the same
``--out`` computes only the missing shards; an ``--out`` written with other settings is
refused.

Methods by model: transformers get the package's methods (cdam, tam, relevance, rollout,
attention_map); CNNs get Captum's references ``gradcam`` (``LayerGradCam`` on the last
feature stage) and ``ig`` (``IntegratedGradients``) from :mod:`captum_ext.references`; both
get the trained explainers ``ttame`` and ``mhex``, from the zoo (a zoo model with a fitted
entry) or from a file written by ``TTAME.save`` / ``MHEX.save`` (``--explainer FILE``,
verified against the model). A method that does not explain the model is refused in one line
naming what the model gets; ``--method all`` runs everything that applies.

Everything that can be checked is checked before the model runs: the output folder can
be written (and is empty, unless ``--overwrite``), every image decodes (``--dataset``
folders too) and reads as RGB (:func:`captum_ext.models.to_rgb`), the weights fit the
model, the labels file exists, the targets name classes, every ``--explainer`` file
verifies and belongs to the model.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_ext.cli._common import (
    DATASET_HELP,
    ZOO_MODELS,
    CLIError,
    HelpFormatter,
    add_chunk_size,
    add_device,
    add_num_examples,
    add_quiet,
    as_flags,
    build_methods,
    check_image_file,
    check_methods,
    check_out_dir,
    count,
    first_line,
    is_main_process,
    model_record,
    open_dataset,
    resolve_device,
    staged_output,
    write_json,
)

if TYPE_CHECKING:
    import torch

    from captum_ext.models import LoadedModel

__all__ = ["add_parser", "run"]

TOP_K = 5

EPILOG = f"""\
model specs:
  timm:ARCH   a timm architecture (ViT or CNN); weights from --weights FILE (never downloaded)
  torchvision:ARCH
              a torchvision classifier (resnet50, vgg16, efficientnet_b0...); weights from
              --weights FILE; preprocessing from the architecture's default weights entry
  hf:DIR      a HuggingFace folder written by save_pretrained (image or text classifier;
              text models use the tokenizer saved in DIR)
  zoo:NAME    a model shipped with captum_ext (captum_ext.zoo):
              {ZOO_MODELS}

methods:
  transformers  cdam, tam, relevance, rollout, attention_map
  CNNs          gradcam (Captum LayerGradCam on the last feature stage, ReLU, bilinear
                upsampling) and ig (Captum IntegratedGradients, black baseline, channel
                sum, --ig-steps): reference rows
  both          ttame, mhex: trained explainers, used once fitted: the zoo's for a zoo
                model that ships one (shapes-cnn, shapes-vit), else --explainer FILE
                (written by TTAME.save / MHEX.save, or `captum-ext fit ttame --model SPEC
                [--weights FILE] --data DIR --out FILE`); a file fitted to another model
                is refused
  all           everything that applies to the model

examples:
  captum-ext explain --model timm:vit_small_patch16_224 --weights vit_s16.safetensors \\
      --image cat.png dog.jpg --method cdam --target 281 285
  captum-ext explain --model timm:vit_tiny_patch16_224 --weights tiny.safetensors \\
      --model-kwargs '{{"img_size": 32, "patch_size": 8}}' --image photos/ --method all
  captum-ext explain --model timm:vit_small_patch16_224 --weights my_head.safetensors \\
      --labels labels.txt --image 'shots/*.jpg' --method cdam --target tabby
  captum-ext explain --model hf:./my-vit --image x.png --method relevance
  captum-ext explain --model zoo:shapes-cnn --image shapes.png --method ttame mhex gradcam ig
  captum-ext explain --model timm:resnet18 --weights resnet18.safetensors --image photos/ \
      --method gradcam ig ttame --explainer resnet18-ttame.safetensors
  captum-ext explain --model hf:./my-bert --text "a great movie" --method cdam --target 1
  captum-ext explain --model zoo:shapes-vit --image shapes.png --method cdam --target circ
  captum-ext explain --model zoo:shapes-vit --dataset shapes --n 1000 --method cdam \\
      --target label --out shards/              # every present class of every image
  torchrun --nproc_per_node 8 -m captum_ext.cli explain --model timm:vit_small_patch16_224 \\
      --weights vit_s16.safetensors --dataset val/ --method cdam --device cuda --out shards/

writes, per input and target: NAME_METHOD_classK.png (the map over the greyscale image,
400x400 px; green = for the class, red = against, white = 0, with a colour bar) and
NAME_METHOD_classK.npy (the map in input space); for texts text.html, text.png and
token-score .npy files; always attributions.safetensors (every map) and
prediction.json (top classes and scores: softmax, or sigmoid for multi-label models).
--dataset writes shard-CCCCC.safetensors/.json (maps, example indices and ids, targets,
scores) per --chunk-size examples and index.json; run again to resume.
A non-empty --out is refused unless --overwrite, which replaces its content.
Weights: .safetensors preferred; .pt/.pth/.bin are read with torch.load(weights_only=True).
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``explain`` subcommand to ``sub``."""
    from captum_ext.cli import _concept

    p = sub.add_parser(
        "explain",
        help="explain your own model on local images or texts",
        description="Explain a timm, torchvision, HuggingFace or zoo model (transformer or "
        "CNN) on local images or texts with one or more methods, or an encoder against a "
        "concept.",
        epilog=EPILOG + _concept.EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="timm:ARCH, torchvision:ARCH, hf:DIR or zoo:NAME",
    )
    p.add_argument("--weights", metavar="PATH", help="weights file (.safetensors preferred)")
    p.add_argument(
        "--model-kwargs",
        metavar="JSON",
        help="timm.create_model / torchvision get_model keyword arguments, as JSON",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="class names for a custom head: one per line, or a JSON list",
    )
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--image",
        nargs="+",
        metavar="IMG",
        help="image files, folders (every image in them, sorted) or glob patterns",
    )
    inputs.add_argument("--text", nargs="+", metavar="TEXT", help="texts to classify and explain")
    inputs.add_argument("--dataset", metavar="SOURCE", help=DATASET_HELP)
    _concept.add_arguments(p)
    p.add_argument(
        "--method",
        nargs="+",
        required=True,
        metavar="NAME",
        help="cdam, tam, relevance, rollout, attention_map (transformers); gradcam, ig "
        "(CNNs); ttame, mhex (trained); or all (one or more); encoders (--concept): cdam only",
    )
    p.add_argument(
        "--explainer",
        action="extend",
        nargs="+",
        metavar="FILE",
        help="a fitted T-TAME or MHEX (the .safetensors or .json written by TTAME.save / "
        "MHEX.save, or their base path); the file says which method it is; one per method",
    )
    p.add_argument(
        "--ig-steps",
        type=count(1),
        default=32,
        metavar="N",
        help="steps of ig, Captum IntegratedGradients (default: %(default)s)",
    )
    p.add_argument(
        "--target",
        nargs="+",
        metavar="K",
        help="class indices, names or unambiguous name prefixes, or (--dataset) label: "
        "the ImageFolder class / every present shapes class (default: the top class)",
    )
    add_num_examples(p, "--dataset shapes: number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, help="--dataset shapes: data seed (default: held-out)")
    add_chunk_size(p)
    p.add_argument(
        "--batch-size",
        type=count(1),
        default=8,
        metavar="N",
        help="inputs per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--out", default="captum-ext-explain", help="output folder (default: %(default)s)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the content of a non-empty --out with this run's output",
    )
    add_device(p)
    add_quiet(p)
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


def _image_suffixes() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _expand_images(values: list[str]) -> list[Path]:
    """Files as given; folders to the images in them and glob patterns to their matches,
    sorted (images by PIL's registered suffixes)."""
    suffixes = _image_suffixes()
    out: list[Path] = []
    for value in values:
        path = Path(value)
        if path.is_dir():
            found = sorted(
                f for f in path.iterdir() if f.is_file() and f.suffix.lower() in suffixes
            )
            if not found:
                raise CLIError(f"--image {path}: no images in the folder")
        elif path.is_file():
            found = [path]
        elif re.search(r"[*?[]", value):
            matches = sorted(Path(f) for f in glob.glob(value, recursive=True))
            found = [f for f in matches if f.is_file() and f.suffix.lower() in suffixes]
            if not found:
                raise CLIError(f"--image {value}: no images match the pattern")
        else:
            raise CLIError(f"--image {path}: no such file")
        out.extend(found)
    return list(dict.fromkeys(out))


def _check_images(paths: list[Path]) -> None:
    """Reads every image once, so that a broken file stops the command before any work."""
    for path in paths:
        check_image_file(path, "--image")


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
    out = []
    for v in values:
        if re.fullmatch(r"-?\d+", v):
            k = int(v)
            if not 0 <= k < len(names):
                raise CLIError(f"--target {k} is out of range: the model has {len(names)} classes")
        else:
            k = _class_by_name(v, names)
        out.append(k)
    return list(dict.fromkeys(out))


def _class_by_name(value: str, names: list[str]) -> int:
    """The class named ``value`` (any case), or the one class whose name starts with it."""
    key = value.lower()
    matches = [i for i, n in enumerate(names) if n.lower() == key]
    matches = matches or [i for i, n in enumerate(names) if n.lower().startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise CLIError(f"--target {value!r} is neither a class index nor a class name ({shown})")
    shown = ", ".join(f"{names[i]} ({i})" for i in matches[:8])
    raise CLIError(
        f"--target {value!r} is ambiguous: {len(matches)} classes match "
        f"({shown}{', ...' if len(matches) > 8 else ''}); use more letters or the class index"
    )


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


def _explainers(
    methods: list[str], loaded: LoadedModel, args: argparse.Namespace, skip_unsupported: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """The attribution objects by name, and where each trained explainer came from.

    With ``skip_unsupported`` (``--method all``) what does not apply to the model is left
    out with a note; otherwise it is refused in one line.
    """
    options = {"ig": {"n_steps": args.ig_steps}}
    out = build_methods(methods, loaded.model, loaded.spec, skip_unsupported, options)
    trained, sources = _trained(methods, loaded, args, skip_unsupported)
    out.update(trained)
    out = {m: out[m] for m in methods if m in out}  # in the order asked for
    from captum_ext.registry import TRAINED

    left = [m for m in methods if m not in out and m not in TRAINED]
    unfitted = [m for m in methods if m not in out and m in TRAINED]
    if skip_unsupported and left:
        print(f"note: not run on {loaded.spec} (they do not explain it): {', '.join(left)}")
    if skip_unsupported and unfitted:
        print(
            f"note: not run: {', '.join(unfitted)} (no fitted explainer for {loaded.spec}: "
            "captum-ext fit METHOD ... --out FILE, then --explainer FILE)"
        )
    if not out:
        raise CLIError(f"no method supports {loaded.spec}")
    return out, sources


def _explainer_files(values: list[str] | None) -> dict[str, Path]:
    """``--explainer`` files by the method their record names (verified, not yet loaded)."""
    from captum_ext.checkpoint import checkpoint_paths, verify_checkpoint
    from captum_ext.errors import CheckpointError
    from captum_ext.registry import TRAINED

    found: dict[str, Path] = {}
    for value in values or []:
        paths = checkpoint_paths(value)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise CLIError(
                f"--explainer {value}: no such file {missing[0]} (TTAME.save / MHEX.save "
                "write a .safetensors and a .json beside it)"
            )
        try:
            method = verify_checkpoint(value).get("method")
        except CheckpointError as err:
            raise CLIError(f"--explainer {value}: {err.problem}; {err.remedy}") from err
        if method not in TRAINED:
            raise CLIError(
                f"--explainer {value}: not a fitted {' or '.join(TRAINED)} (its record's "
                f"method is {method!r})"
            )
        if method in found:
            raise CLIError(f"--explainer: two {method} files ({found[method]}, {value}); give one")
        found[method] = Path(value)
    return found


def _fit_first(method: str, spec: str, args: argparse.Namespace) -> CLIError:
    weights = f" --weights {args.weights}" if args.weights else ""
    return CLIError(
        f"{method} on {spec} must be fitted first: captum-ext fit {method} --model "
        f"{spec}{weights} --data DIR --out FILE, then pass --explainer FILE"
    )


def _check_fitted_before_loading(methods: list[str], args: argparse.Namespace) -> None:
    """Refuses a trained explainer named for a model outside the zoo without its
    ``--explainer`` file, before the model is loaded (``all`` skips what is missing)."""
    from captum_ext.registry import TRAINED

    if "all" in map(str.lower, args.method) or args.model.startswith("zoo:"):
        return
    files = _explainer_files(args.explainer)
    for m in methods:
        if m in TRAINED and m not in files:
            raise _fit_first(m, args.model, args)


def _trained(
    methods: list[str], loaded: LoadedModel, args: argparse.Namespace, skip_unsupported: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """The trained explainers among ``methods``: from ``--explainer`` files, else the zoo's
    entry fitted to the zoo model (verified against the model: refused when ``--weights``
    replaced the weights it was fitted to)."""
    from captum_ext import zoo
    from captum_ext.errors import CheckpointError, UnsupportedModelError
    from captum_ext.registry import TRAINED

    files = _explainer_files(args.explainer)
    for m, path in files.items():
        if m not in methods:
            raise CLIError(f"--explainer {path} is a fitted {m}; add --method {m} to use it")
    shipped = set(zoo.available(kind="explainer"))
    zoo_model = loaded.spec[4:] if loaded.spec.startswith("zoo:") else None
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for m in (m for m in methods if m in TRAINED):
        spec = TRAINED[m]
        if m in files:
            path, source = files[m], str(files[m])
        elif zoo_model is not None and zoo_model + spec.zoo_suffix in shipped:
            entry = zoo_model + spec.zoo_suffix
            path, source = zoo.WEIGHTS_DIR / entry, f"zoo:{entry}"
        elif skip_unsupported:
            continue
        else:
            raise _fit_first(m, loaded.spec, args)
        try:
            out[m] = spec.build.load(path, loaded.model)
        except CheckpointError as err:
            if m in files and err.problem.startswith("made for"):
                raise CLIError(
                    f"--explainer {path}: {err.problem}: it belongs to another model; pass the "
                    f"--model (and --weights) it was fitted on, or fit one for {loaded.spec} "
                    f"(captum-ext fit {m} --model {loaded.spec} ...)"
                ) from err
            if m not in files and err.problem.startswith("made for"):
                raise CLIError(
                    f"{m} ({source}) was fitted to the zoo's weights of {loaded.spec}, not to "
                    f"--weights {args.weights}; fit one for them (captum-ext fit {m} --model "
                    f"{loaded.spec} --weights {args.weights} ...) and pass --explainer FILE"
                ) from err
            where = f"--explainer {path}" if m in files else f"{m} ({source})"
            raise CLIError(f"{where}: {err.problem}; {err.remedy}") from err
        except (UnsupportedModelError, ValueError) as err:
            raise CLIError(f"{m} ({source}) on {loaded.spec}: {first_line(err)}") from err
        sources[m] = source
    return out, sources


def _explain_batch(
    explainers: dict[str, Any],
    items: list[_Item],
    inputs: torch.Tensor,
    extra: tuple[torch.Tensor, ...] | None,
    targets: list[int] | None,
    step: Callable[[int], Any],
) -> None:
    """Fills ``item.maps`` for a batch: every method, for the given targets (the same for
    every input) or for each input's top class (one call with a target per input)."""
    import torch

    from captum_ext.errors import MissingAttentionError, UnsupportedModelError

    kwargs = {} if extra is None else {"additional_forward_args": extra}
    calls = [[k] * len(items) for k in targets] if targets else [[i.targets[0] for i in items]]
    for m, explainer in explainers.items():
        for ks in calls:
            target = torch.tensor(ks, device=inputs.device)  # (B,)
            try:
                maps = explainer.attribute(inputs, target=target, **kwargs).detach().float().cpu()
            except (ValueError, UnsupportedModelError, MissingAttentionError) as err:
                raise CLIError(f"{m}: {first_line(err)}") from err
            for item, k, attr in zip(items, ks, maps):
                item.maps[m, k] = attr  # images (1, H, W), texts (T,)
            step(len(items))


def _explain_images(
    loaded: LoadedModel,
    paths: list[Path],
    explainers: dict[str, Any],
    targets: list[int] | None,
    batch_size: int,
    step: Callable[[int], Any],
) -> list[_Item]:
    import torch
    from PIL import Image

    named = list(zip(_unique_names([p.stem for p in paths]), paths))
    items: list[_Item] = []
    for start in range(0, len(named), batch_size):
        chunk = named[start : start + batch_size]
        xs = []
        for _, path in chunk:
            with Image.open(path) as img:
                xs.append(loaded.image_transform(img))
        x = torch.stack(xs).to(loaded.device)  # (B, 3, H, W) at the model's input size
        probs = loaded.probabilities(loaded.logits(x)).cpu()
        display = loaded.display(x).cpu()
        batch = [
            _Item(name, str(path), p, _top(loaded, p), targets or [int(p.argmax())], display=d)
            for (name, path), p, d in zip(chunk, probs, display)
        ]
        _explain_batch(explainers, batch, x, None, targets, step)
        items += batch
    return items


def _explain_texts(
    loaded: LoadedModel,
    texts: list[str],
    explainers: dict[str, Any],
    targets: list[int] | None,
    batch_size: int,
    step: Callable[[int], Any],
) -> list[_Item]:
    """Texts are batched with texts of the same token count (no padding: each map is the
    one the text alone would get)."""
    import torch

    encoded = [loaded.tokenize(t) for t in texts]
    by_length: dict[int, list[int]] = {}
    for i, enc in enumerate(encoded):
        by_length.setdefault(enc.input_ids.shape[1], []).append(i)
    items: dict[int, _Item] = {}
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            ids = torch.cat([encoded[i].input_ids for i in chunk]).to(loaded.device)
            mask = torch.cat([encoded[i].attention_mask for i in chunk]).to(loaded.device)
            probs = loaded.probabilities(loaded.logits(ids, mask)).cpu()
            batch = []
            for i, p in zip(chunk, probs):
                item = _Item(f"text{i}", texts[i], p, _top(loaded, p), targets or [int(p.argmax())])
                item.tokens = encoded[i].tokens
                items[i] = item
                batch.append(item)
            _explain_batch(explainers, batch, ids, (mask,), targets, step)
    return [items[i] for i in range(len(texts))]


def _entry(item: _Item, class_names: list[str], files: list[str]) -> dict[str, Any]:
    """The ``prediction.json`` entry of one input: its top classes, targets and files."""
    return {
        "name": item.name,
        "input": item.source,
        **({"tokens": item.tokens} if item.tokens is not None else {}),
        "top": item.top,
        "targets": [
            {"class": k, "label": class_names[k], "score": float(item.probs[k])}
            for k in item.targets
        ],
        "files": files,
    }


def _write(
    out: Path,
    loaded: LoadedModel,
    items: list[_Item],
    methods: list[str],
    device: str,
    sources: dict[str, str] | None = None,
) -> list[Path]:
    import numpy as np
    from safetensors.torch import save_file

    from captum_ext.registry import method_group, method_spec
    from captum_ext.viz import TextRow, html_text, save_overlay, text_figure, text_record

    tensors: dict[str, torch.Tensor] = {}
    records, rows, entries = [], [], []
    score = "sigmoid" if loaded.multi_label else "softmax"
    for item in items:
        files = []
        for (m, k), attr in item.maps.items():
            spec = method_spec(m)
            stem = f"{item.name}_{m}_class{k}"
            tensors[f"{item.name}/{m}/class{k}"] = attr.contiguous()
            raw = attr[0] if item.display is not None else attr  # (H, W) or (T,)
            np.save(out / f"{stem}.npy", raw.numpy().astype(np.float32))
            files.append(f"{stem}.npy")
            if spec.class_agnostic:  # the same map for every target: name no class
                label = attr_class = f"{spec.label} (class-agnostic)"
            else:
                label = (
                    f"{spec.label}: {loaded.class_names[k]} ({score} {float(item.probs[k]):.3f})"
                )
                attr_class = f"{loaded.class_names[k]} ({spec.label})"
            if item.display is not None:
                save_overlay(
                    out / f"{stem}.png", attr, item.display, spec.signed, label, unit=spec.unit
                )
                files.append(f"{stem}.png")
            else:
                pred = item.top[0]
                records.append(
                    text_record(attr, item.tokens, pred["score"], pred["label"], "n/a", attr_class)
                )
                rows.append(TextRow(f"{item.name} {label}", item.tokens, attr, spec.signed))
        entries.append(_entry(item, loaded.class_names, files))
    if records:
        (out / "text.html").write_text(html_text(records))
        fig = text_figure(rows, title=f"{loaded.spec}")
        fig.savefig(out / "text.png", dpi=100)
    save_file(tensors, str(out / "attributions.safetensors"), metadata={"model": loaded.spec})
    write_json(
        out / "prediction.json",
        {
            "model": loaded.spec,
            "device": device,
            "score": "sigmoid (multi-label)" if loaded.multi_label else "softmax",
            "methods": {
                m: {
                    "label": method_spec(m).label,
                    "signed": method_spec(m).signed,
                    "group": method_group(m),
                    **({"explainer": (sources or {})[m]} if m in (sources or {}) else {}),
                }
                for m in methods
            },
            "preprocessing": loaded.preprocessing,
            "notes": loaded.notes,
            "inputs": entries,
        },
    )
    return sorted(p.relative_to(out) for p in out.iterdir())


def run(args: argparse.Namespace) -> int:
    """Runs ``captum-ext explain`` (see the module docstring for the outputs)."""
    from captum_ext.cli import _concept

    if _concept.handles(args):  # a bare encoder, or --concept: concept CDAM
        return _concept.run(args)
    from captum_ext._scores import progress

    methods = check_methods(args.method)
    device = resolve_device(args.device)
    if args.dataset:
        return _run_dataset(args, methods, device)
    out = Path(args.out)
    mode = "replace" if args.overwrite else "new"
    check_out_dir(out, mode)
    images = _expand_images(args.image) if args.image else None
    if images:
        _check_images(images)
    _check_fitted_before_loading(methods, args)
    loaded = _load_model(args, device)
    wanted = "image" if images else "text"
    if loaded.modality != wanted:
        use = "an image model; use --image FILE" if wanted == "text" else "a text model; use --text"
        raise CLIError(f"{loaded.spec} is {use}")
    targets = _parse_targets(args.target, loaded.class_names)
    for note in loaded.notes:
        print(f"note: {note}")
    every = "all" in map(str.lower, args.method)
    explainers, sources = _explainers(methods, loaded, args, every)
    methods = list(explainers)
    inputs: list[Any] = images if images else args.text
    total = len(inputs) * len(methods) * len(targets or [None])
    with progress(total=total, show=not args.quiet, desc="explain", unit="map", leave=False) as bar:
        explain = _explain_images if images else _explain_texts
        items = explain(loaded, inputs, explainers, targets, args.batch_size, bar.update)
    with staged_output(out, mode) as tmp:
        files = _write(tmp, loaded, items, methods, device, sources)
    for item in items:
        best = item.top[0]
        print(f"{item.name}: top class {best['class']} {best['label']!r} ({best['score']:.3f})")
    print(
        f"wrote {len(files)} files to {out}/: "
        + ", ".join(map(str, files[:6]))
        + (", ..." if len(files) > 6 else "")
    )
    return 0


def _load_model(args: argparse.Namespace, device: str) -> LoadedModel:
    """The model of ``--model`` (with ``--weights``, ``--labels``, ``--model-kwargs``)."""
    from captum_ext.models import load, read_class_names

    weights = Path(args.weights) if args.weights else None
    if weights is not None and not weights.is_file():
        raise CLIError(f"--weights {weights}: no such file")
    names = read_class_names(args.labels) if args.labels else None
    return load(
        args.model,
        weights,
        device,
        model_kwargs=_parse_kwargs(args.model_kwargs),
        class_names=names,
    )


def _run_dataset(args: argparse.Namespace, methods: list[str], device: str) -> int:
    """``explain --dataset``: every example, sharded and resumable (one process or torchrun)."""
    from captum_ext.distributed import local_device
    from captum_ext.evaluation import DEFAULT_SEED, ShardedOutputError, explain_dataset

    device = str(local_device(device))
    out = Path(args.out)
    check_out_dir(out, "merge")
    loaded = _load_model(args, device)
    seed = DEFAULT_SEED if args.seed is None else args.seed
    data = open_dataset(args.dataset, loaded, args.n, seed)
    if args.target == ["label"]:
        targets: str | list[int] = "label"
    else:
        targets = _parse_targets(args.target, loaded.class_names) or "top"
    from captum_ext.registry import TRAINED

    every = "all" in map(str.lower, args.method)
    trained = [m for m in methods if m in TRAINED]
    if (trained and not every) or args.explainer:
        raise CLIError(
            f"--dataset runs the methods and Captum references ({', '.join(trained) or 'ttame, mhex'}"
            " not yet); explain --image FILES with a trained explainer"
        )
    explainers = build_methods(
        methods, loaded.model, loaded.spec, every, {"ig": {"n_steps": args.ig_steps}}
    )
    if not explainers:
        raise CLIError(f"no method supports {loaded.spec}")
    main = is_main_process()
    try:
        run = explain_dataset(
            loaded.model,
            list(explainers),
            data,
            out,
            targets=targets,
            multi_label=loaded.multi_label,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            device=device,
            model_record=model_record(loaded.spec, loaded.model),
            overwrite=args.overwrite,
            show_progress=not args.quiet and main,
        )
    except (ShardedOutputError, ValueError) as err:
        raise CLIError(as_flags(first_line(err), out)) from err
    if main:
        print(
            f"explained {len(data)} examples with {', '.join(explainers)}: "
            f"{len(run.index['shards'])} shards in {out}/ ({len(run.computed)} computed, "
            f"{len(run.reused)} reused) and {out / 'index.json'}"
        )
    return 0
