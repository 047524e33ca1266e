"""``captum-ext explain`` on bare encoders: concept CDAM against ``--concept`` texts or
``--concept-image`` images.

An ``hf:DIR`` folder holding a bare encoder (a sentence-transformers model, or a
``BertModel``/``RobertaModel``/``DistilBertModel``/``ViTModel`` written by
``save_pretrained``) has no classes to explain. :class:`~captum_ext.attr.cdam.ConceptCDAM`
explains instead the similarity ``<z(x), c>`` of the input's latent ``z(x)`` (the folder's
pooling, see :func:`captum_ext.models.encoder_layout`) with a concept vector ``c``: the mean
latent of the concept texts (or images), encoded by the same encoder and pooling
(:meth:`~captum_ext.attr.cdam.ConceptCDAM.concept_from_examples`).

Written per input: ``NAME_cdam_concept.npy`` (token scores ``(T,)``, or the map ``(H, W)``)
and, for images, ``NAME_cdam_concept.png``; for texts ``text.html`` and ``text.png``; always
``attributions.safetensors`` (keys ``NAME/cdam/concept``) and ``prediction.json`` (the
concept inputs, the encoder's pooling, and per input the similarity: the dot product the
map explains and the cosine).

Every refusal is one line, before anything is written; a bare encoder without a concept,
a concept on a classifier, and a method other than ``cdam`` are refused from the folder's
JSON files alone, before torch is imported. Module level: standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_ext.cli._common import (
    CLIError,
    check_image_file,
    check_out_dir,
    first_line,
    resolve_device,
    staged_output,
    write_json,
)

if TYPE_CHECKING:
    import torch

    from captum_ext.models import LoadedModel

__all__ = ["EPILOG", "add_arguments", "handles", "run"]

METHOD = "cdam"
LABEL = "Concept CDAM"
NOTE = "the class is the concept: green raises the similarity to it, red lowers it"
_TEXT_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "camembert")
_IMAGE_TYPES = ("vit", "deit")

EPILOG = """
encoders and concepts (concept CDAM):
  hf:DIR may also hold a bare encoder: a sentence-transformers folder (modules.json, its
  Pooling config), or a BertModel / RobertaModel / DistilBertModel / ViTModel folder. It has
  no classes: --method cdam explains the similarity of each input's latent with a concept,
  the mean latent of --concept texts (text encoders) or --concept-image files (ViTs). Only
  cdam explains encoders; --target, --labels, --weights and --dataset do not apply.
  captum-ext explain --model hf:./all-MiniLM-L6-v2 --method cdam \\
      --concept "a happy dog" --concept "a playful puppy" --text "the dog ran to me"
  captum-ext explain --model hf:./my-vit-encoder --method cdam \\
      --concept-image dogs/ --image park.jpg
  prediction.json then records the concept inputs and, per input, the similarity
  (dot product, which the map explains, and cosine) instead of top classes.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds ``--concept`` and ``--concept-image`` to the ``explain`` parser."""
    p.add_argument(
        "--concept",
        nargs="+",
        action="extend",
        metavar="TEXT",
        help="text encoders (hf:DIR without a classifier head): explain the similarity with "
        "the mean latent of these texts (concept CDAM; repeatable)",
    )
    p.add_argument(
        "--concept-image",
        nargs="+",
        action="extend",
        metavar="IMG",
        help="vision encoders (ViTModel): the concept is the mean latent of these images "
        "(files, folders or glob patterns)",
    )


def _peek(spec: str) -> tuple[str, str, str] | None:
    """``(kind, architecture, modality)`` of an ``hf:`` folder from its JSON files alone:
    kind ``"encoder"`` (sentence-transformers, or a bare BERT-family / ViT model) or
    ``"classifier"``; ``None`` when the spec is not an ``hf:`` folder or the files do not
    say (the loader then names what is wrong)."""
    kind, _, value = spec.partition(":")
    folder = Path(value)
    if kind != "hf" or not folder.is_dir():
        return None
    model_dir = folder
    try:
        if (folder / "modules.json").is_file():
            modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
            paths = [
                str(m.get("path", ""))
                for m in modules
                if str(m.get("type", "")).endswith(".Transformer")
            ]
            model_dir = folder / paths[0] if paths else folder
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        archs = [str(a) for a in config.get("architectures") or []]
        model_type = str(config.get("model_type", ""))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if not archs:
        return None
    modality = (
        "text" if model_type in _TEXT_TYPES else "image" if model_type in _IMAGE_TYPES else ""
    )
    if all(a.endswith("Model") and "For" not in a for a in archs) and modality:
        return "encoder", archs[0], modality
    if any(re.search(r"For(Sequence|Image)Classification$", a) for a in archs):
        return "classifier", archs[0], modality
    return None


def handles(args: argparse.Namespace) -> bool:
    """Whether this request is concept CDAM's: a concept was given, or ``--model`` is an
    ``hf:`` folder holding a bare encoder (read from its JSON files, without torch)."""
    if args.concept or args.concept_image:
        return True
    peeked = _peek(args.model)
    return peeked is not None and peeked[0] == "encoder"


def _check_request(args: argparse.Namespace) -> str | None:
    """Refuses, in one line, what concept CDAM cannot do; returns the encoder's modality
    when the folder's JSON files tell it (``None`` when only loading will)."""
    spec = args.model
    peeked = _peek(spec)
    concept = "--concept" if args.concept else "--concept-image"
    kind, _, value = spec.partition(":")
    if args.concept and args.concept_image:
        raise CLIError("--concept and --concept-image: give one kind of concept (texts or images)")
    if peeked is not None and peeked[0] == "encoder":
        arch, modality = peeked[1], peeked[2]
        if not (args.concept or args.concept_image):
            flag = "--concept TEXT" if modality == "text" else "--concept-image IMG"
            raise CLIError(
                f"{spec} holds a {arch} encoder (no classifier head): explain it against a "
                f"concept with {flag} (concept CDAM, --method cdam), or pass a classifier"
            )
    elif kind == "hf" and not Path(value).is_dir():
        raise CLIError(f"--model {spec}: no such folder")
    elif kind != "hf" or (peeked is not None and peeked[0] == "classifier"):
        what = f"holds a {peeked[1]} classifier" if peeked else "is a classifier"
        raise CLIError(
            f"{concept}: {spec} {what}; concept CDAM explains a bare encoder (hf:DIR of a "
            "sentence-transformers, BertModel or ViTModel folder); explain a classifier's "
            "classes with --target"
        )
    else:
        modality = None
    for name in args.method:
        if name.lower() != METHOD:
            raise CLIError(
                f"--method {name}: an encoder is explained with cdam only (concept CDAM, the "
                f"similarity to {concept}); use --method cdam"
            )
    for flag, value in (
        ("--dataset", args.dataset),
        ("--target", args.target),
        ("--labels", args.labels),
        ("--weights", args.weights),
        ("--model-kwargs", args.model_kwargs),
    ):
        if value:
            raise CLIError(
                f"{flag} does not apply to an encoder explained against a concept "
                "(no classes, the folder's own weights, one input at a time); leave it out"
            )
    if modality is not None:
        _check_modality(spec, modality, args)
    return modality


def _check_modality(spec: str, modality: str, args: argparse.Namespace) -> None:
    """The concept and the inputs are of the encoder's modality."""
    if modality == "text" and (args.concept_image or args.image):
        raise CLIError(
            f"{spec} is a text encoder: give the concept with --concept TEXT and the inputs "
            "with --text"
        )
    if modality == "image" and (args.concept or args.text):
        raise CLIError(
            f"{spec} is a vision encoder: give the concept with --concept-image IMG and the "
            "inputs with --image"
        )


def run(args: argparse.Namespace) -> int:
    """``captum-ext explain`` with concept CDAM (see the module docstring)."""
    modality = _check_request(args)
    device = resolve_device(args.device)
    out = Path(args.out)
    mode = "replace" if args.overwrite else "new"
    check_out_dir(out, mode)
    from captum_ext.cli.explain import _expand_images

    images = _expand_images(args.image) if args.image else []
    concept_images = _expand_images_flag(args.concept_image) if args.concept_image else []
    for path in images:
        check_image_file(path, "--image")
    for path in concept_images:
        check_image_file(path, "--concept-image")

    from captum_ext.models import load_encoder

    loaded = load_encoder(args.model, device)
    if modality is None:
        _check_modality(loaded.spec, loaded.modality, args)
    for note in loaded.notes:
        print(f"note: {note}")
    from captum_ext import ConceptCDAM

    assert loaded.encoder is not None
    readout = "cls" if loaded.encoder.pooling == ("cls",) else "mean"
    cdam = ConceptCDAM(loaded.model, readout=readout)
    try:
        if loaded.modality == "text":
            concept = _text_concept(cdam, loaded, args.concept)
            items = _explain_texts(cdam, loaded, concept, args.text, args.batch_size, args.quiet)
        else:
            concept = _image_concept(cdam, loaded, concept_images, args.batch_size)
            items = _explain_images(cdam, loaded, concept, images, args.batch_size, args.quiet)
    except ValueError as err:
        raise CLIError(f"cdam: {first_line(err)}") from err
    concept_inputs = (
        {"texts": list(args.concept)}
        if loaded.modality == "text"
        else {"images": [str(p) for p in concept_images]}
    )
    with staged_output(out, mode) as tmp:
        files = _write(tmp, loaded, items, concept_inputs, device)
    for item in items:
        sim = item["similarity"]
        print(
            f"{item['name']}: similarity to the concept {sim['dot']:.4g} "
            f"(cosine {sim['cosine']:.3f})"
        )
    print(
        f"wrote {len(files)} files to {out}/: "
        + ", ".join(map(str, files[:6]))
        + (", ..." if len(files) > 6 else "")
    )
    return 0


def _expand_images_flag(values: list[str]) -> list[Path]:
    """``--concept-image`` values as ``--image`` reads them; messages name the flag."""
    from captum_ext.cli.explain import _expand_images

    try:
        return _expand_images(values)
    except CLIError as err:
        raise CLIError(str(err).replace("--image", "--concept-image", 1)) from None


def _text_concept(cdam: Any, loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
    """The mean latent ``(D,)`` of the concept texts (each encoded alone, no padding)."""
    import torch

    assert loaded.tokenize is not None
    latents = []
    for text in texts:
        enc = loaded.tokenize(text)
        ids, mask = enc.input_ids.to(loaded.device), enc.attention_mask.to(loaded.device)
        latents.append(cdam.concept_from_examples(ids, (mask,)))
    return torch.stack(latents).mean(0)


def _image_concept(
    cdam: Any, loaded: LoadedModel, paths: list[Path], batch_size: int
) -> torch.Tensor:
    """The mean latent ``(D,)`` of the concept images (batches weighted by their size)."""
    total = None
    for start in range(0, len(paths), batch_size):
        x = _images(loaded, paths[start : start + batch_size])
        part = cdam.concept_from_examples(x) * x.shape[0]
        total = part if total is None else total + part
    assert total is not None
    return total / len(paths)


def _images(loaded: LoadedModel, paths: list[Path]) -> torch.Tensor:
    import torch
    from PIL import Image

    assert loaded.image_transform is not None
    xs = []
    for path in paths:
        with Image.open(path) as img:
            xs.append(loaded.image_transform(img))
    return torch.stack(xs).to(loaded.device)


def _similarity(z: torch.Tensor, concept: torch.Tensor) -> list[dict[str, float]]:
    c = concept.to(z)
    dot = (z * c).sum(-1)
    cos = dot / (z.norm(dim=-1) * c.norm()).clamp_min(1e-12)
    return [{"dot": float(d), "cosine": float(k)} for d, k in zip(dot, cos)]


def _explain_texts(
    cdam: Any,
    loaded: LoadedModel,
    concept: torch.Tensor,
    texts: list[str],
    batch_size: int,
    quiet: bool,
) -> list[dict[str, Any]]:
    """Token scores of each text, batched with texts of the same token count (no padding:
    each map is the one the text alone gets)."""
    import torch

    from captum_ext._scores import progress

    assert loaded.tokenize is not None
    encoded = [loaded.tokenize(t) for t in texts]
    groups: dict[int, list[int]] = {}
    for i, enc in enumerate(encoded):
        groups.setdefault(enc.input_ids.shape[1], []).append(i)
    items: dict[int, dict[str, Any]] = {}
    with progress(total=len(texts), show=not quiet, desc="explain", unit="map", leave=False) as bar:
        for group in groups.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                ids = torch.cat([encoded[i].input_ids for i in chunk]).to(loaded.device)
                mask = torch.cat([encoded[i].attention_mask for i in chunk]).to(loaded.device)
                maps = cdam.attribute(ids, concept, additional_forward_args=(mask,))
                sims = _similarity(loaded.logits(ids, mask), concept)
                for i, attr, sim in zip(chunk, maps.detach().float().cpu(), sims):
                    items[i] = {
                        "name": f"text{i}",
                        "input": texts[i],
                        "tokens": encoded[i].tokens,
                        "map": attr,  # (T,)
                        "similarity": sim,
                    }
                bar.update(len(chunk))
    return [items[i] for i in range(len(texts))]


def _explain_images(
    cdam: Any,
    loaded: LoadedModel,
    concept: torch.Tensor,
    paths: list[Path],
    batch_size: int,
    quiet: bool,
) -> list[dict[str, Any]]:
    from captum_ext._scores import progress
    from captum_ext.cli.explain import _unique_names

    names = _unique_names([p.stem for p in paths])
    items = []
    with progress(total=len(paths), show=not quiet, desc="explain", unit="map", leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            x = _images(loaded, chunk)
            maps = cdam.attribute(x, concept).detach().float().cpu()  # (B, 1, H, W)
            sims = _similarity(loaded.logits(x), concept)
            display = loaded.display(x).cpu()
            for j, path in enumerate(chunk):
                items.append(
                    {
                        "name": names[start + j],
                        "input": str(path),
                        "map": maps[j],
                        "display": display[j],
                        "similarity": sims[j],
                    }
                )
            bar.update(len(chunk))
    return items


def _write(
    out: Path,
    loaded: LoadedModel,
    items: list[dict[str, Any]],
    concept_inputs: dict[str, list[str]],
    device: str,
) -> list[Path]:
    import numpy as np
    from safetensors.torch import save_file

    from captum_ext.viz import TextRow, html_text, save_overlay, text_figure, text_record

    layout = loaded.encoder
    assert layout is not None
    tensors, records, rows, entries = {}, [], [], []
    for item in items:
        stem = f"{item['name']}_{METHOD}_concept"
        attr, sim = item["map"], item["similarity"]
        tensors[f"{item['name']}/{METHOD}/concept"] = attr.contiguous()
        raw = attr[0] if "display" in item else attr  # (H, W) or (T,)
        np.save(out / f"{stem}.npy", raw.numpy().astype(np.float32))
        files = [f"{stem}.npy"]
        label = f"{LABEL}: similarity to the concept {sim['dot']:.4g} (cosine {sim['cosine']:.3f})"
        if "display" in item:
            save_overlay(out / f"{stem}.png", attr, item["display"], True, label, NOTE)
            files.append(f"{stem}.png")
        else:
            records.append(
                text_record(attr, item["tokens"], sim["cosine"], "concept", "n/a", LABEL)
            )
            rows.append(TextRow(f"{item['name']} {label}", item["tokens"], attr, True))
        entries.append(
            {
                "name": item["name"],
                "input": item["input"],
                **({"tokens": item["tokens"]} if "tokens" in item else {}),
                "similarity": sim,
                "files": files,
            }
        )
    if records:
        (out / "text.html").write_text(html_text(records))
        fig = text_figure(rows, title=f"{loaded.spec} ({LABEL})", note=NOTE)
        fig.savefig(out / "text.png", dpi=100)
    save_file(tensors, str(out / "attributions.safetensors"), metadata={"model": loaded.spec})
    write_json(
        out / "prediction.json",
        {
            "model": loaded.spec,
            "device": device,
            "encoder": {
                "architecture": layout.architecture,
                "modality": layout.modality,
                "sentence_transformers": layout.sentence_transformers,
                "pooling": list(layout.pooling),
                "normalize": layout.normalize,
            },
            "methods": {METHOD: {"label": LABEL, "signed": True}},
            "concept": concept_inputs,
            "score": "similarity <z(x), concept> of the input's latent with the mean latent "
            "of the concept inputs (the map explains it); cosine alongside",
            "preprocessing": loaded.preprocessing,
            "notes": loaded.notes,
            "inputs": entries,
        },
    )
    return sorted(p.relative_to(out) for p in out.iterdir())
