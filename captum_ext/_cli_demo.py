"""``captum-ext demo`` and ``captum-ext evaluate``: the shipped zoo models on held-out data.

The demo draws benchmark images and texts from :data:`DEMO_SEED`, a seed the zoo's
training never used, picks as many two-object images as one-object ones, and
explains every present class with every registered method.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from captum_ext._cli_common import (
    CLIError,
    check_out_dir,
    resolve_device,
    staged_output,
    write_json,
)
from captum_ext._cli_models import check_zoo_name, zoo_class_names, zoo_module, zoo_multi_label

__all__ = [
    "DEMO_SEED",
    "IMAGE_MODELS",
    "TEXT_METHODS",
    "TEXT_MODEL",
    "image_grid",
    "run_demo",
    "run_evaluate",
    "run_metrics",
    "text_outputs",
]

DEMO_SEED = 90_210
"""Seed of the demo's benchmark data; the zoo trains and validates on other seeds."""

IMAGE_MODELS: tuple[str, ...] = ("shapes-vit", "shapes-vit-plain", "shapes-vit-free")
"""Image models drawn by the demo; the first goes to ``explanations.png``."""

TEXT_MODEL = "text-bert"
TEXT_METHODS: tuple[str, ...] = ("cdam", "tam", "relevance")


def _progress(iterable: Any, desc: str, show: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not show, leave=False, **kwargs)


def pick_images(labels: torch.Tensor, n: int) -> list[int]:
    """Indices of ``n`` images: ``ceil(n / 2)`` with two or more objects, the rest with one.

    Args:
        labels: Multi-hot labels ``(N, K)``.
        n: How many to pick.
    """
    counts = labels.sum(1)
    multi = [i for i in range(len(counts)) if counts[i] >= 2]
    single = [i for i in range(len(counts)) if counts[i] == 1]
    k = min(len(multi), (n + 1) // 2)
    return sorted(multi[:k] + single[: n - k])


def image_grid(name: str, n: int, device: str, show_progress: bool = False):
    """The explanation grid of zoo image model ``name`` on ``n`` held-out images.

    Rows are (image, present class) pairs; columns the input, the class's ground-truth
    mask and every registered method that supports the model (signed methods in a
    diverging colormap centred at 0).

    Returns:
        ``(figure, summary)``; the summary names the images, rows and methods.
    """
    from captum_ext.data import shapes
    from captum_ext.errors import UnsupportedModelError
    from captum_ext.registry import METHODS, make_method
    from captum_ext.viz import figure_grid

    zoo = zoo_module()
    model = zoo.load(name, device=device).eval()
    names = zoo_class_names(name)
    batch = shapes(4 * n + 16, DEMO_SEED, **zoo.data_kwargs(name))
    idx = pick_images(batch.labels, n)
    rows = [(i, k) for i in idx for k in batch.labels[i].nonzero().flatten().tolist()]
    img_idx = torch.tensor([i for i, _ in rows], dtype=torch.long)
    cls_idx = torch.tensor([k for _, k in rows], dtype=torch.long)
    x = batch.images[img_idx].to(device)
    masks = batch.masks[img_idx, cls_idx].float()
    with torch.no_grad():
        logits = model(x).float()
    probs = (logits.sigmoid() if zoo_multi_label(name) else logits.softmax(-1)).cpu()
    maps: dict[str, torch.Tensor] = {}
    signed: dict[str, bool] = {}
    skipped: list[str] = []
    for method in _progress(list(METHODS), f"{name}: methods", show_progress):
        spec = METHODS[method]
        try:
            explainer = make_method(method, model)
        except UnsupportedModelError:
            skipped.append(spec.label)
            continue
        maps[spec.label] = explainer.attribute(x, target=cls_idx.to(device)).detach().cpu()
        signed[spec.label] = spec.signed
    labels = [f"#{i} {names[k]}\np={float(probs[r, k]):.2f}" for r, (i, k) in enumerate(rows)]
    fig = figure_grid(x.cpu(), maps, labels, masks=masks, signed=signed)
    signed_labels = [label for label, is_signed in signed.items() if is_signed]
    fig.suptitle(
        f"{name}: held-out images (seed {DEMO_SEED}), one row per present class; "
        f"{', '.join(signed_labels)}: red = for the row's class, blue = against",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    summary = {
        "model": name,
        "seed": DEMO_SEED,
        "images": idx,
        "rows": [{"image": i, "class": names[k]} for i, k in rows],
        "methods": list(maps),
        "skipped": skipped,
    }
    return fig, summary


def text_outputs(n: int, device: str, show_progress: bool = False):
    """CDAM, TAM and relevance on ``n`` held-out texts of the zoo's text model.

    Each text is explained for its true class; the planted rationale is outlined in
    the figure.

    Returns:
        ``(html, figure, summary)``: Captum ``visualize_text`` HTML, the token-box
        figure and a summary.
    """
    from captum_ext._cli_render import TextRow, text_figure
    from captum_ext.data import text_rationales
    from captum_ext.registry import METHODS, make_method
    from captum_ext.viz import html_text, text_record

    zoo = zoo_module()
    model = zoo.load(TEXT_MODEL, device=device).eval()
    names = zoo_class_names(TEXT_MODEL)
    batch = text_rationales(n, DEMO_SEED, **zoo.data_kwargs(TEXT_MODEL))
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    from captum_ext.adapters import model_output_to_tensor

    with torch.no_grad():
        probs = model_output_to_tensor(model(ids, mask)).float().softmax(-1).cpu()
    scores = {}
    for m in _progress(TEXT_METHODS, f"{TEXT_MODEL}: methods", show_progress):
        explainer = make_method(m, model)
        scores[m] = (
            explainer.attribute(
                ids, target=batch.labels.to(device), additional_forward_args=(mask,)
            )
            .detach()
            .cpu()
        )
    records, rows = [], []
    for i in range(n):
        tokens = [batch.vocab[t] for t in batch.input_ids[i].tolist()]
        keep = batch.attention_mask[i].bool()
        true, pred = int(batch.labels[i]), int(probs[i].argmax())
        for m in TEXT_METHODS:
            label = METHODS[m].label
            records.append(
                text_record(
                    scores[m][i],
                    tokens,
                    float(probs[i, pred]),
                    names[pred],
                    names[true],
                    f"{names[true]} ({label})",
                    mask=batch.attention_mask[i],
                )
            )
            rows.append(
                TextRow(
                    f"#{i} {names[true]:>4} {label}",
                    batch.decode(i),
                    scores[m][i][keep],
                    METHODS[m].signed,
                    batch.rationale[i][keep].tolist(),
                )
            )
    fig = text_figure(
        rows,
        title=f"{TEXT_MODEL}: held-out texts (seed {DEMO_SEED}), explained for the true class",
        note="outlined: planted rationale; CDAM/TAM red = for the class, blue = against; "
        "each row scaled by its own max |score|",
    )
    summary = {"model": TEXT_MODEL, "seed": DEMO_SEED, "texts": n, "methods": list(TEXT_METHODS)}
    return html_text(records), fig, summary


def run_metrics(
    models: Sequence[str],
    methods: Sequence[str] | None,
    n: int,
    seed: int | None,
    bootstrap: int,
    device: str,
    show_progress: bool = False,
) -> tuple[str, dict[str, Any]]:
    """``captum_ext.evaluation.evaluate`` on zoo models (with its baselines).

    Returns:
        ``(markdown, data)``: the result's tables (one per model) and its JSON dict.
    """
    from captum_ext.evaluation import evaluate

    kwargs: dict[str, Any] = {"n": n, "bootstrap": bootstrap, "device": device}
    if seed is not None:
        kwargs["seed"] = seed
    result = evaluate(list(models), methods, show_progress=show_progress, **kwargs)
    return result.to_markdown(), result.to_dict()


def run_demo(args: argparse.Namespace) -> int:
    """Runs ``captum-ext demo``."""
    device = resolve_device(args.device)
    out = Path(args.out)
    check_out_dir(out)
    zoo = zoo_module()
    available = list(zoo.available())
    image_models = [m for m in IMAGE_MODELS if m in available]
    if not image_models:
        raise CLIError(
            f"the zoo of this installation has none of the demo's models "
            f"({', '.join(IMAGE_MODELS)}; it has: {', '.join(available) or 'no weights'})"
        )
    show = sys.stderr.isatty()
    start = time.perf_counter()
    with staged_output(out) as tmp:
        written: list[tuple[str, str]] = []
        summary: dict[str, Any] = {"device": device, "seed": DEMO_SEED, "grids": []}
        for j, name in enumerate(_progress(image_models, "image models", show)):
            fig, info = image_grid(name, args.n, device, show)
            file = "explanations.png" if j == 0 else f"explanations-{name}.png"
            fig.savefig(tmp / file, dpi=110)
            summary["grids"].append({"file": file, **info})
            written.append(
                (file, f"{name}: {len(info['rows'])} rows x {len(info['methods'])} methods")
            )
        if TEXT_MODEL in available:
            html, fig, info = text_outputs(args.n, device, show)
            (tmp / "text.html").write_text(html)
            fig.savefig(tmp / "text.png", dpi=110)
            summary["text"] = info
            written.append(("text.html", f"{TEXT_MODEL}: Captum visualize_text, {args.n} texts"))
            written.append(("text.png", f"{TEXT_MODEL}: tokens coloured by score"))
        md, data = run_metrics(available, None, args.eval_n, None, 200, device, show)
        header = (
            f"# captum-ext demo metrics\n\nzoo models on {args.eval_n} held-out examples each "
            "(captum_ext.evaluation.evaluate, 200 bootstrap resamples)\n\n"
        )
        (tmp / "metrics.md").write_text(header + md)
        write_json(tmp / "metrics.json", {"n": args.eval_n, **data})
        written.append(("metrics.md", f"evaluation of {', '.join(available)}"))
        written.append(("metrics.json", "the same, as JSON"))
        write_json(tmp / "demo.json", summary)
        written.append(("demo.json", "what was drawn: seed, images, rows, methods"))
    print(f"captum-ext demo: wrote {out}/ in {time.perf_counter() - start:.0f} s")
    for file, what in written:
        print(f"  {out / file}  ({what})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Runs ``captum-ext evaluate``."""
    from captum_ext._cli_explain import check_methods

    device = resolve_device(args.device)
    out = Path(args.out)
    check_out_dir(out)
    models = list(args.models or zoo_module().available())
    for name in models:
        check_zoo_name(name)
    methods = check_methods(args.methods) if args.methods else None
    md, data = run_metrics(models, methods, args.n, args.seed, args.bootstrap, device, True)
    with staged_output(out) as tmp:
        (tmp / "metrics.md").write_text(md)
        write_json(tmp / "metrics.json", {"n": args.n, "seed": args.seed, **data})
    print(md)
    print(f"wrote {out / 'metrics.md'} and {out / 'metrics.json'}")
    return 0
