"""``captum-ext demo``: every method on the shipped zoo models and held-out data.

The demo draws benchmark images and texts from :data:`DEMO_SEED`, a seed the zoo's
training never used, picks as many two-object images as one-object ones, and
explains every present class with every registered method. :func:`image_grid` (one
model's figure) and :func:`text_outputs` (the text model's) are public, for scripts such as
``tutorials/make_readme_figure.py``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_ext.cli._common import (
    CLIError,
    add_device,
    add_quiet,
    check_out_dir,
    count,
    resolve_device,
    run_metrics,
    staged_output,
    write_json,
)

if TYPE_CHECKING:
    import torch

    from captum_ext.viz import TextRow

__all__ = [
    "DEMO_SEED",
    "IMAGE_MODELS",
    "TEXT_METHODS",
    "TEXT_MODEL",
    "add_parser",
    "eval_examples",
    "image_grid",
    "pick_images",
    "reliance_notes",
    "run",
    "text_outputs",
]

DEMO_SEED = 90_210
"""Seed of the demo's benchmark data; the zoo trains and validates on other seeds."""

IMAGE_MODELS: tuple[str, ...] = ("shapes-vit", "shapes-vit-plain", "shapes-vit-free", "shapes-cnn")
"""Image models drawn by the demo; the first goes to ``explanations.png``."""

EVAL_N = 8
"""Held-out examples per model in the demo's metrics table (``--full``: :data:`FULL_EVAL_N`)."""
FULL_EVAL_N = 32
"""Held-out examples per model in the demo's metrics table with ``--full``."""

TEXT_MODEL = "text-bert"
TEXT_METHODS: tuple[str, ...] = ("cdam", "tam", "relevance")

EPILOG = """\
examples:
  captum-ext demo                          # CPU, offline, writes ./captum-ext-demo/
  captum-ext demo --out /tmp/demo --n 6    # six held-out images per model
  captum-ext demo --device cuda
  captum-ext demo --full                   # the metrics table on 32 examples per model

writes explanations.png (shapes-vit: rows = image x present class, columns = input,
ground-truth mask, every method over the image, T-TAME and MHEX where the zoo ships them
fitted to the model; green = for the row's class, red = against, white = 0, a colour bar
per method labelled with its unit; where the model relies on a cell outside the object,
the row label and the caption say so, with the logit drops of removing that cell and the
object's own), the same for shapes-vit-plain, shapes-vit-free and shapes-cnn (T-TAME, MHEX,
Captum GradCAM and IntegratedGradients; explanations-NAME.png), text.html and text.png
(text-bert), metrics.md and metrics.json (captum_ext.evaluation on 8 held-out examples
per model; --full: 32, the slower full table; --eval-n: any number).
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``demo`` subcommand to ``sub``."""
    p = sub.add_parser(
        "demo",
        help="explain the shipped zoo models on held-out benchmark data (offline, CPU; 22 s measured on an idle 2-core machine)",
        description="Run every method on the shipped zoo models and held-out benchmark "
        "images and texts; write figures and a metrics table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="captum-ext-demo", help="output folder (default: %(default)s)")
    add_device(p)
    p.add_argument(
        "--n",
        type=count(1),
        default=4,
        help="held-out images (and texts) per model (default: %(default)s)",
    )
    p.add_argument(
        "--eval-n",
        type=count(1),
        default=None,
        help=f"images (texts) per model for the metrics table (default: {EVAL_N}; "
        f"{FULL_EVAL_N} with --full)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help=f"the full metrics table: {FULL_EVAL_N} examples per model (slower)",
    )
    add_quiet(p)
    return p


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


def image_grid(name: str, n: int, device: str = "cpu", show_progress: bool = False):
    """The explanation grid of zoo image model ``name`` on ``n`` held-out images.

    The images come from :func:`captum_ext.data.shapes` with seed :data:`DEMO_SEED` (never
    used in training), half of them (rounded up) with two objects. Rows are (image,
    present class) pairs, labelled with the class and its score (sigmoid for multi-label
    models, else softmax); columns the input, the class's ground-truth mask and every
    registered method that supports the model and every trained explainer the zoo ships for
    it (T-TAME, MHEX: :func:`captum_ext.evaluation.zoo_explainers`; maps in ``[0, 1]``), each
    explaining the row's class, drawn over the image in :mod:`captum_ext.viz`'s colours
    (green = for the class, red = against, white = 0; a colour bar per column). A CNN, which
    no transformer method supports, also gets Captum's ``LayerGradCam`` (last stage) and
    ``IntegratedGradients``. Class-agnostic methods (rollout, the attention map) are titled
    so: the row's class does not apply to them. Each method's colour bar is labelled with its
    unit (``MethodSpec.unit``). A row whose model relies on a cell outside the object
    (:func:`reliance_notes`) says so in its label, and the caption gives the logit drops of
    removing that cell and the object's own.

    Args:
        name: A zoo image model (e.g. ``"shapes-vit"``, see :data:`IMAGE_MODELS`).
        n: Number of images; the figure has one row per present class (``n`` to ``2n``).
        device: Where to run the model.
        show_progress: A tqdm bar over the methods, on stderr.

    Returns:
        ``(figure, summary)``: a ``matplotlib.figure.Figure`` and a dict naming the model,
        the seed, the image indices, the rows (``{"image": i, "class": name}``, plus
        ``"relies_on"``: :meth:`Reliance.as_dict` where the model relies on a cell outside the
        object), the methods drawn and those skipped (the model is not of a family they
        support).

    Raises:
        ModelLoadError: ``name`` is not a zoo model.

    Example::

        fig, summary = image_grid("shapes-vit", 4)
        fig.savefig("explanations.png", dpi=110)
    """
    from captum_ext.data import shapes
    from captum_ext.models import load
    from captum_ext.viz import figure_grid
    from captum_ext.zoo import data_kwargs

    loaded = load(f"zoo:{name}", device=device)
    batch = shapes(4 * n + 16, DEMO_SEED, **data_kwargs(name))
    idx, rows, img_idx, cls_idx = _grid_rows(batch.labels, n)
    x = batch.images[img_idx].to(device)
    masks = batch.masks[img_idx, cls_idx].float()
    probs = loaded.probabilities(loaded.logits(x)).cpu()
    cols = _grid_columns(loaded.model, name, x, cls_idx, device, show_progress)
    reliance = reliance_notes(loaded.model, x, cls_idx, masks, [i for i, _ in rows])
    labels = _row_labels(loaded, rows, probs)
    notes = []
    for r, found in enumerate(reliance):
        if found is not None:
            labels[r] += "\n" + found.row_label()
            notes.append(found.caption(loaded.class_names[rows[r][1]]))
    fig = figure_grid(
        x.cpu(),
        cols.maps,
        labels,
        masks=masks,
        signed=cols.signed,
        class_agnostic=cols.agnostic,
        overlay=True,
        title=f"{name}: held-out images (seed {DEMO_SEED}), one row per present class "
        "and its score",
        note="\n".join([f"rows labelled '{RELIANCE_MARK}':", *notes]) if notes else None,
        units=cols.units,
    )
    summary = _grid_summary(name, idx, rows, loaded.class_names, cols)
    for row, found in zip(summary["rows"], reliance):
        if found is not None:
            row["relies_on"] = found.as_dict(row["class"])
    return fig, summary


RELIANCE_MARK = "model relies on a cell outside the object"
"""Added to the label of a row :func:`reliance_notes` flags; the caption explains each."""


@dataclass(frozen=True)
class Reliance:
    """A row whose model relies on a cell outside the explained object (:func:`reliance_notes`).

    Attributes:
        image: The image's index in the demo's data (the row label's ``#i``).
        cell: ``(row, column)`` of the cell with the largest logit drop, 0-based.
        drop: The target logit's drop when that cell's token is removed.
        object_cell: ``(row, column)`` of the object's own cell with the largest drop.
        object_drop: That drop.
        neighbour: ``cell`` touches the object (a side or a corner).
    """

    image: int
    cell: tuple[int, int]
    drop: float
    object_cell: tuple[int, int]
    object_drop: float
    neighbour: bool

    def row_label(self) -> str:
        """The line added to the row's label: :data:`RELIANCE_MARK`, in two lines."""
        return RELIANCE_MARK.replace(" on ", " on\n", 1)

    def caption(self, class_name: str) -> str:
        """The caption line: ``"#0 square: the model relies on the neighbouring cell ..."``."""
        where = "the neighbouring cell" if self.neighbour else "a cell away from it"
        r, c = self.cell
        return (
            f"#{self.image} {class_name}: the model relies on {where} (row {r + 1}, column "
            f"{c + 1}), not the {class_name}'s own: removing it drops the logit by "
            f"{self.drop:.2f}, removing the {class_name}'s cell by {self.object_drop:.2f} "
            "(TAM); maps that light that cell show the model, not a plotting error"
        )

    def as_dict(self, class_name: str) -> dict[str, Any]:
        """The row's entry in ``demo.json``."""
        return {
            "cell": list(self.cell),
            "drop": self.drop,
            "object_cell": list(self.object_cell),
            "object_drop": self.object_drop,
            "neighbour": self.neighbour,
            "caption": self.caption(class_name),
        }


def reliance_notes(
    model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    images: list[int],
) -> list[Reliance | None]:
    """Per row, whether the model relies on a cell outside the explained object.

    Each patch-grid cell's token is removed in turn and the drop of the target's raw logit
    measured (:class:`captum_ext.attr.TokenAblation` at ``output="grid"``, the TAM
    column's own numbers). A row is flagged when the cell of the largest drop lies outside
    the object (no pixel of ``masks`` in it) and drops the logit by more than twice as much
    as the object's own best cell: TAM, relevance, rollout or T-TAME then light that cell,
    which is what the model does and no misplaced overlay.

    Args:
        model: The classifier (a transformer: a model TAM does not support gives no notes).
        x: Images ``(R, 3, H, W)``, one per row.
        targets: The row's class ``(R,)``.
        masks: The object of the row's class ``(R, H, W)``.
        images: The image index of each row (for the caption).

    Returns:
        One :class:`Reliance` or ``None`` per row.
    """
    import torch

    from captum_ext.attr import TokenAblation
    from captum_ext.errors import UnsupportedModelError

    try:
        tam = TokenAblation(model)
        drops = tam.attribute(x, target=targets.to(x.device), output="grid").detach().cpu()
    except UnsupportedModelError:
        return [None] * len(images)
    drops = drops[:, 0].double()  # (R, h, w)
    h, w = drops.shape[-2:]
    on_object = torch.nn.functional.adaptive_max_pool2d(masks.float()[:, None].cpu(), (h, w))
    on_object = on_object[:, 0] > 0
    notes: list[Reliance | None] = []
    for r, i in enumerate(images):
        d, obj = drops[r], on_object[r]
        if not obj.any():
            notes.append(None)
            continue
        peak = divmod(int(d.argmax()), w)
        own = d.masked_fill(~obj, float("-inf"))
        own_cell = divmod(int(own.argmax()), w)
        peak_drop, own_drop = float(d[peak]), float(d[own_cell])
        if obj[peak] or peak_drop <= 0 or peak_drop <= 2 * max(own_drop, 0.0):
            notes.append(None)
            continue
        near = obj[max(peak[0] - 1, 0) : peak[0] + 2, max(peak[1] - 1, 0) : peak[1] + 2]
        notes.append(Reliance(i, peak, peak_drop, own_cell, own_drop, bool(near.any())))
    return notes


def _grid_rows(
    labels: torch.Tensor, n: int
) -> tuple[list[int], list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """The picked images, their (image, present class) rows and the rows' index tensors."""
    import torch

    idx = pick_images(labels, n)
    rows = [(i, k) for i in idx for k in labels[i].nonzero().flatten().tolist()]
    img_idx = torch.tensor([i for i, _ in rows], dtype=torch.long)
    cls_idx = torch.tensor([k for _, k in rows], dtype=torch.long)
    return idx, rows, img_idx, cls_idx


@dataclass
class _GridColumns:
    """The map columns of :func:`image_grid` and the methods left out."""

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    signed: dict[str, bool] = field(default_factory=dict)
    agnostic: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)


def _grid_columns(
    model: Any,
    name: str,
    x: torch.Tensor,
    cls_idx: torch.Tensor,
    device: str,
    show_progress: bool,
) -> _GridColumns:
    """Maps of every registered method, zoo explainer and (CNN) Captum reference
    (:data:`captum_ext.registry.REFERENCES`) for ``cls_idx``."""
    from captum_ext._scores import progress
    from captum_ext.errors import UnsupportedModelError
    from captum_ext.evaluation import zoo_explainers
    from captum_ext.registry import METHODS, REFERENCES, make_method

    cols = _GridColumns()
    for method in progress(list(METHODS), show_progress, f"{name}: methods", leave=False):
        spec = METHODS[method]
        try:
            explainer = make_method(method, model)
        except UnsupportedModelError:
            cols.skipped.append(spec.label)
            continue
        cols.maps[spec.label] = explainer.attribute(x, target=cls_idx.to(device)).detach().cpu()
        cols.signed[spec.label] = spec.signed
        cols.units[spec.label] = spec.unit
        if spec.class_agnostic:
            cols.agnostic.append(spec.label)
    for spec, explainer in zoo_explainers(name, device=device).values():
        cols.maps[spec.label] = explainer.attribute(x, target=cls_idx.to(device)).detach().cpu()
        cols.signed[spec.label] = spec.signed
        cols.units[spec.label] = spec.unit
    for spec in REFERENCES.values():  # Captum's references, for CNNs
        try:
            ref = make_method(spec.name, model)
        except UnsupportedModelError:
            continue
        label = f"{spec.label}\n({ref.setting})"
        cols.maps[label] = ref.attribute(x, target=cls_idx.to(device)).cpu()
        cols.signed[label] = spec.signed
        cols.units[label] = spec.unit
    return cols


def _grid_summary(
    name: str,
    idx: list[int],
    rows: list[tuple[int, int]],
    names: list[str],
    cols: _GridColumns,
) -> dict[str, Any]:
    """The summary of :func:`image_grid` (see there)."""
    return {
        "model": name,
        "seed": DEMO_SEED,
        "images": idx,
        "rows": [{"image": i, "class": names[k]} for i, k in rows],
        "methods": list(cols.maps),
        "skipped": cols.skipped,
    }


def _row_labels(loaded: Any, rows: list[tuple[int, int]], probs: torch.Tensor) -> list[str]:
    """``"#image class\n(score p)"`` for each (image, class) row."""
    names = loaded.class_names
    score = "sigmoid" if loaded.multi_label else "softmax"
    return [f"#{i} {names[k]}\n({score} {float(probs[r, k]):.2f})" for r, (i, k) in enumerate(rows)]


def text_outputs(n: int, device: str, show_progress: bool = False):
    """CDAM, TAM and relevance on ``n`` held-out texts of the zoo's text model.

    Each text is explained for its true class; the planted rationale is outlined in
    the figure.

    Args:
        n: Number of texts (seed :data:`DEMO_SEED`).
        device: Where to run the model.
        show_progress: A tqdm bar over the methods, on stderr.

    Returns:
        ``(html, figure, summary)``: Captum ``visualize_text`` HTML, the token-box
        figure and a summary.
    """
    from captum_ext._scores import progress
    from captum_ext.data import text_rationales
    from captum_ext.models import load
    from captum_ext.registry import make_method
    from captum_ext.viz import html_text, text_figure
    from captum_ext.zoo import data_kwargs

    loaded = load(f"zoo:{TEXT_MODEL}", device=device)
    batch = text_rationales(n, DEMO_SEED, **data_kwargs(TEXT_MODEL))
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    probs = loaded.probabilities(loaded.logits(ids, mask)).cpu()
    scores = {}
    for m in progress(TEXT_METHODS, show_progress, f"{TEXT_MODEL}: methods", leave=False):
        explainer = make_method(m, loaded.model)
        scores[m] = (
            explainer.attribute(
                ids, target=batch.labels.to(device), additional_forward_args=(mask,)
            )
            .detach()
            .cpu()
        )
    records, rows = _text_rows(n, batch, scores, probs, loaded.class_names)
    fig = text_figure(
        rows,
        title=f"{TEXT_MODEL}: held-out texts (seed {DEMO_SEED}), explained for the true class",
        note="outlined: planted rationale",
    )
    summary = {"model": TEXT_MODEL, "seed": DEMO_SEED, "texts": n, "methods": list(TEXT_METHODS)}
    return html_text(records), fig, summary


def _text_rows(
    n: int, batch: Any, scores: dict[str, torch.Tensor], probs: torch.Tensor, names: list[str]
) -> tuple[list[Any], list[TextRow]]:
    """Captum ``visualize_text`` records and :class:`TextRow` s, per text and method."""
    from captum_ext.registry import METHODS
    from captum_ext.viz import TextRow, text_record

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
    return records, rows


def eval_examples(args: argparse.Namespace) -> int:
    """Examples per model of the demo's metrics table: ``--eval-n``, else :data:`FULL_EVAL_N`
    with ``--full``, else :data:`EVAL_N`."""
    if args.eval_n is not None:
        return args.eval_n
    return FULL_EVAL_N if args.full else EVAL_N


def run(args: argparse.Namespace) -> int:
    """Runs ``captum-ext demo``."""
    from captum_ext import zoo
    from captum_ext._scores import progress

    device = resolve_device(args.device)
    out = Path(args.out)
    check_out_dir(out)
    available = list(zoo.available())
    image_models = [m for m in IMAGE_MODELS if m in available]
    if not image_models:
        raise CLIError(
            f"the zoo of this installation has none of the demo's models "
            f"({', '.join(IMAGE_MODELS)}; it has: {', '.join(available) or 'no weights'})"
        )
    show = not args.quiet
    start = time.perf_counter()
    with staged_output(out) as tmp:
        written: list[tuple[str, str]] = []
        summary: dict[str, Any] = {"device": device, "seed": DEMO_SEED, "grids": []}
        for j, name in enumerate(progress(image_models, show, "image models", leave=False)):
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
        eval_n = eval_examples(args)
        md, data = run_metrics(available, None, eval_n, None, 200, device, show)
        header = (
            f"# captum-ext demo metrics\n\nzoo models on {eval_n} held-out examples each "
            "(captum_ext.evaluation.evaluate, 200 bootstrap resamples"
            + ("" if eval_n >= FULL_EVAL_N else f"; `captum-ext demo --full`: {FULL_EVAL_N}")
            + ")\n\n"
        )
        (tmp / "metrics.md").write_text(header + md)
        write_json(tmp / "metrics.json", {"n": eval_n, **data})
        written.append(("metrics.md", f"evaluation of {', '.join(available)}"))
        written.append(("metrics.json", "the same, as JSON"))
        write_json(tmp / "demo.json", summary)
        written.append(("demo.json", "what was drawn: seed, images, rows, methods"))
    print(f"captum-ext demo: wrote {out}/ in {time.perf_counter() - start:.0f} s")
    for file, what in written:
        print(f"  {out / file}  ({what})")
    return 0
