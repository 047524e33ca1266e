"""From token and patch maps to Captum's visualisation inputs, and every figure captum_ext draws.

Captum's ``visualize_image_attr`` wants ``(H, W, C)`` numpy arrays and
``visualize_text`` wants ``VisualizationDataRecord``s; :func:`to_hwc`,
:func:`image_to_hwc` and :func:`text_record` convert captum_ext's ``(B, 1, H, W)``
and ``(B, T)`` maps.

One colour convention for every figure, Captum's own (:data:`SIGNED_CMAP`,
:data:`POSITIVE_CMAP`, stated by :func:`colour_note`):

- signed maps (CDAM, TAM): **green = evidence for the class, red = against,
  white = 0**, on a scale symmetric about 0 (``±max|map|``). This is the colormap
  of ``visualize_image_attr(..., sign="all")`` and the hues of ``visualize_text``,
  so the HTML view and the PNGs agree.
- non-negative maps (relevance, rollout, attention map): white (0) to green
  (the largest value), Captum's ``"Greens"`` for ``sign="positive"``; negative
  values, if any, are drawn as 0.

Each figure states its scale and unit: :func:`figure_grid` has a colour bar under each
map column (labelled with the method's unit, ``units``) and a caption,
:func:`overlay_figure` (:func:`save_overlay`) a colour bar in the map's own units, labelled
with the unit (``unit``: ``captum_ext.registry.METHODS[name].unit``, e.g. ``"logit drop"``
for TAM), and a caption, :func:`text_figure` a legend and a caption,
:func:`html_text` Captum's legend and a caption.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import Colormap, LinearSegmentedColormap

__all__ = [
    "OVERLAY_ALPHA",
    "OVERLAY_DPI",
    "OVERLAY_INCHES",
    "POSITIVE_CMAP",
    "SIGNED_CMAP",
    "TextRow",
    "cmap_for",
    "colour_note",
    "figure_grid",
    "html_text",
    "image_to_hwc",
    "is_special_token",
    "overlay_figure",
    "save_overlay",
    "text_figure",
    "text_record",
    "to_hwc",
]

SIGNED_CMAP: Colormap = LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"])
"""Signed maps: red (``-max|map|``, against the class), white (0), green (``+max|map|``, for
the class). The same colours as Captum's default for ``visualize_image_attr(sign="all")``."""

POSITIVE_CMAP: Colormap = colormaps["Greens"]
"""Non-negative maps: white (0) to dark green (the maximum); Captum's default for
``sign="positive"``."""

OVERLAY_ALPHA = 0.5
"""Opacity of a map drawn over its (greyscale) image, as Captum's ``blended_heat_map``."""

OVERLAY_INCHES = 5
"""Side of an overlay figure (:func:`overlay_figure`) in inches."""
OVERLAY_DPI = 80
"""Resolution of :func:`save_overlay`: ``OVERLAY_INCHES * OVERLAY_DPI`` = 400 pixels square."""

Interpolation = Literal["nearest", "bilinear"]

_SPECIAL = re.compile(
    r"\[(CLS|SEP|PAD|MASK|BOS|EOS)\]|<(s|/s|pad|mask|cls|sep|bos|eos)>|<\|[A-Za-z_]+\|>"
)


def cmap_for(signed: bool) -> Colormap:
    """The colormap of the convention: :data:`SIGNED_CMAP` or :data:`POSITIVE_CMAP`."""
    return SIGNED_CMAP if signed else POSITIVE_CMAP


def colour_note(signed: bool | None = None, per: str = "cell") -> str:
    """The sentence every figure uses to state the colour convention and its scale.

    Args:
        signed: ``True`` if the figure holds only signed maps, ``False`` only
            non-negative ones, ``None`` both kinds.
        per: What one scale covers (``"cell"``, ``"row"``, ``"column"``, ``"map"``).

    Example::

        >>> colour_note(True, "row")
        'green = evidence for the class, red = against, white = 0; scale ±max|map| per row'
    """
    if signed is False:
        return f"white = 0, green = the largest value; scale 0 to max per {per}"
    text = "green = evidence for the class, red = against, white = 0"
    if signed is None:
        text += " (maps that are never negative: white to green)"
    return f"{text}; scale ±max|map| per {per}"


def is_special_token(token: str) -> bool:
    """Whether ``token`` is a special token that should not set a text's colour scale.

    ``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]`` (BERT), ``<s>``, ``</s>``, ``<pad>``,
    ``<mask>`` (RoBERTa) and ``<|...|>`` (GPT-style) are special; ``[UNK]`` stands for a
    word and is not.
    """
    return bool(_SPECIAL.fullmatch(token.strip()))


def _scale_values(s: np.ndarray, tokens: Sequence[str], exclude_special: bool) -> np.ndarray:
    """The scores that set a text's scale: all, or the non-special ones (all if none is left)."""
    if not exclude_special:
        return s
    keep = np.array([not is_special_token(t) for t in tokens], dtype=bool)
    return s[keep] if keep.any() else s


def to_hwc(attr: torch.Tensor, index: int = 0) -> np.ndarray:
    """One map of ``(B, 1|C, H, W)`` (or ``(1|C, H, W)``, ``(H, W)``) as ``(H, W, 1|C)`` numpy.

    The result is what ``captum.attr.visualization.visualize_image_attr`` takes.
    """
    a = attr.detach()
    if a.dim() == 4:
        a = a[index]
    if a.dim() == 2:
        a = a[None]
    if a.dim() != 3:
        raise ValueError(
            f"expected a map (B, C, H, W), (C, H, W) or (H, W); got {tuple(attr.shape)}"
        )
    return a.permute(1, 2, 0).cpu().double().numpy()


def image_to_hwc(images: torch.Tensor, index: int = 0) -> np.ndarray:
    """An image of ``(B, 3, H, W)`` in [0, 1] as ``(H, W, 3)`` numpy, clipped to [0, 1]."""
    return np.clip(to_hwc(images, index), 0.0, 1.0)


def text_record(
    scores: torch.Tensor,
    tokens: Sequence[str],
    pred_prob: float,
    pred_class: Any,
    true_class: Any,
    attr_class: Any,
    mask: torch.Tensor | None = None,
    exclude_special: bool = True,
):
    """A ``captum.attr.visualization.VisualizationDataRecord`` for one text map ``(T,)``.

    Scores are divided by their maximum absolute value (Captum's colour scale spans
    [-1, 1]: green for, red against); positions where ``mask`` is 0 are dropped.

    Args:
        scores: Token scores ``(T,)``.
        tokens: The ``T`` tokens.
        pred_prob: Score of the predicted class (Captum's "Predicted Label" column).
        pred_class: Predicted class.
        true_class: True class (or ``"n/a"``).
        attr_class: What the map explains (Captum's "Attribution Label" column).
        mask: ``(T,)``, 1 for the tokens to show.
        exclude_special: Special tokens (:func:`is_special_token`: ``[CLS]``, ``[SEP]``,
            padding) are shown but do not set the scale, so that a large score on
            ``[CLS]`` does not wash out the words; theirs is clipped to [-1, 1].
    """
    from captum.attr import visualization as viz

    s = scores.detach().double().cpu()
    toks = list(tokens)
    if mask is not None:
        keep = mask.bool().cpu()
        s = s[keep]
        toks = [t for t, k in zip(toks, keep.tolist()) if k]
    ref = _scale_values(s.numpy(), toks, exclude_special)
    denom = float(np.abs(ref).max()) if ref.size else 0.0
    norm = (s / denom).clamp(-1, 1) if denom > 0 else s
    return viz.VisualizationDataRecord(
        norm, pred_prob, pred_class, true_class, attr_class, float(s.sum()), toks, None
    )


def html_text(records: Sequence[Any], note: str | None = None) -> str:
    """HTML of ``captum.attr.visualization.visualize_text`` for the records, as a string.

    Args:
        records: From :func:`text_record`.
        note: A sentence under the table; by default the colour convention and scale.
    """
    import contextlib
    import html
    import io

    from captum.attr import visualization as viz

    if note is None:
        note = (
            colour_note(True, "row")
            + "; [CLS], [SEP] and padding are shown but do not set the scale"
        )
    # Captum calls IPython's display(), which prints a repr outside notebooks.
    with contextlib.redirect_stdout(io.StringIO()):
        body = viz.visualize_text(list(records), legend=True).data
    return body + f'<p style="font-size: small; color: #555">{html.escape(note)}</p>'


def _upsample(m: torch.Tensor, size: tuple[int, int], interpolation: Interpolation) -> np.ndarray:
    """One map ``(1, h, w)`` (or ``(h, w)``) brought to ``size`` as ``(H, W)`` numpy."""
    if interpolation not in ("nearest", "bilinear"):
        raise ValueError(f'interpolation must be "nearest" or "bilinear"; got {interpolation!r}')
    m = m.detach().double().cpu()
    m = m.reshape(m.shape[-2:]) if m.dim() >= 2 else m
    if m.dim() != 2 or m.numel() == 0:
        raise ValueError(f"expected a map (1, h, w) or (h, w); got {tuple(m.shape)}")
    if tuple(m.shape) != tuple(size):
        kwargs = {"align_corners": False} if interpolation == "bilinear" else {}
        m = torch.nn.functional.interpolate(m[None, None], size=size, mode=interpolation, **kwargs)
        m = m[0, 0]
    return m.numpy()


def _limit(m: np.ndarray, signed: bool) -> float:
    """``max|m|`` (signed) or ``max(m, 0)`` (non-negative), or 1 for an all-zero map."""
    lim = float(np.abs(m).max()) if signed else float(max(m.max(), 0.0))
    return lim if lim > 0 else 1.0


def _draw_map(ax, m: np.ndarray, image: np.ndarray | None, signed: bool, lim: float):
    """Draws one map on ``ax`` in the convention, over the greyscale ``image`` if given.

    Returns:
        The map's ``AxesImage``.
    """
    if image is not None:
        ax.imshow(image.mean(-1), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    return ax.imshow(
        m,
        cmap=cmap_for(signed),
        vmin=-lim if signed else 0.0,
        vmax=lim,
        alpha=OVERLAY_ALPHA if image is not None else None,
        interpolation="nearest",
    )


def _colourbar(fig, cax, signed: bool, lim: float | None, label: str | None = None):
    """A horizontal colour bar of the convention; ``lim=None`` labels it ``±max``/``max``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    top = 1.0 if lim is None else lim
    bar = fig.colorbar(
        ScalarMappable(Normalize(-top if signed else 0.0, top), cmap_for(signed)),
        cax=cax,
        orientation="horizontal",
    )
    ticks = [-top, 0.0, top] if signed else [0.0, top]
    bar.set_ticks(ticks)
    if lim is None:
        bar.set_ticklabels(["−max", "0", "+max"] if signed else ["0", "max"])
    else:
        bar.set_ticklabels([f"{t:.3g}" for t in ticks])
    bar.ax.tick_params(labelsize=6, length=2, pad=1)
    if label:
        bar.set_label(label, fontsize=7)
    return bar


def figure_grid(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    row_labels: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    signed: Mapping[str, bool] | None = None,
    cell: float = 1.6,
    *,
    class_agnostic: Collection[str] = (),
    overlay: bool = False,
    interpolation: Interpolation = "nearest",
    scale: Literal["cell", "column"] = "cell",
    title: str | None = None,
    note: str | None = None,
    units: Mapping[str, str] | None = None,
):
    """A matplotlib figure: one row per image, columns input, mask and each method.

    Colours follow the module's convention (:data:`SIGNED_CMAP` for signed maps,
    :data:`POSITIVE_CMAP` for non-negative ones); each map column has a colour bar
    under its last row and the figure a caption (:func:`colour_note`) that states it.

    Args:
        images: ``(R, 3, H, W)`` in [0, 1], one per row (repeat an image for
            several targets).
        maps: Method name to ``(R, 1, h, w)`` maps: at the image size (a method's
            ``output="input"``) or at the patch grid (``output="grid"``), which is
            upsampled to ``(H, W)`` with ``interpolation``.
        row_labels: Text at the left of each row; name the score, e.g.
            ``"circle (sigmoid 0.97)"``.
        masks: ``(R, H, W)`` ground-truth masks (a column is added).
        signed: Method name to whether its map is signed (default: signed).
        cell: Cell size in inches.
        class_agnostic: Methods whose map does not depend on the target (rollout, the
            attention map: ``captum_ext.registry.METHODS[name].class_agnostic``); their
            column is titled ``"NAME (class-agnostic)"``, as the row's class does not
            apply to them.
        overlay: Draw each map at half opacity over the greyscale image (Captum's
            ``blended_heat_map`` style) instead of alone.
        interpolation: ``"nearest"`` (patch cells stay sharp, the default) or
            ``"bilinear"`` (smooth, as pytorch-grad-cam) for maps smaller than the image.
            A map already at the image size is drawn as it is.
        scale: ``"cell"``: each map scaled to its own ``±max|map|`` (colour bars read
            ``−max, 0, +max``); ``"column"``: one scale per method over all rows (colour
            bars in the map's units).
        title: Figure title.
        note: A sentence appended to the caption; text after a line break in it goes on
            lines of its own under the caption (the figure grows to hold them).
        units: Method name to its unit (``captum_ext.registry.METHODS[name].unit``), the
            label of the method's colour bar; a method not named has an unlabelled bar.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    if scale not in ("cell", "column"):
        raise ValueError(f'scale must be "cell" or "column"; got {scale!r}')
    drawn = _grid_maps(images, maps, interpolation)
    grid = _Grid(
        images,
        drawn,
        masks,
        row_labels,
        dict(signed or {}),
        set(class_agnostic),
        overlay,
        scale,
        dict(units or {}),
    )
    lines = _grid_caption_lines(grid, note)
    fig = _grid_figure(grid, cell, len(lines))
    _grid_caption(fig, grid, cell, title, lines)
    return fig


@dataclass(frozen=True)
class _Grid:
    """What :func:`figure_grid` draws: the images, the upsampled maps and how to draw them."""

    images: torch.Tensor
    drawn: dict[str, np.ndarray]
    masks: torch.Tensor | None
    row_labels: Sequence[str] | None
    signed: dict[str, bool]
    agnostic: set[str]
    overlay: bool
    scale: str
    units: dict[str, str]

    @property
    def columns(self) -> list[str]:
        """Column names: input, mask (when given), then the methods."""
        return ["input"] + (["mask"] if self.masks is not None else []) + list(self.drawn)


def _grid_maps(
    images: torch.Tensor, maps: Mapping[str, torch.Tensor], interpolation: Interpolation
) -> dict[str, np.ndarray]:
    """Every method's maps upsampled to the image size, ``(R, H, W)`` per method."""
    size = tuple(images.shape[-2:])
    rows = images.shape[0]
    return {
        name: np.stack([_upsample(maps[name][r], size, interpolation) for r in range(rows)])
        for name in maps
    }


_CAPTION_LINE_IN = 0.14  # height of one 7 pt caption line, in inches


def _grid_height(cell: float, rows: int, caption_lines: int) -> float:
    """Height in inches of a :func:`figure_grid` of ``rows`` rows and its caption lines."""
    return cell * rows + 0.6 + _CAPTION_LINE_IN * max(caption_lines - 1, 0)


def _grid_figure(grid: _Grid, cell: float, caption_lines: int):
    """The figure of :func:`figure_grid` with every column drawn, before its caption."""
    import matplotlib.pyplot as plt

    rows, cols = grid.images.shape[0], grid.columns
    fig, axes = plt.subplots(
        rows,
        len(cols),
        figsize=(cell * len(cols), _grid_height(cell, rows, caption_lines)),
        squeeze=False,
    )
    for c, name in enumerate(cols):
        _grid_column(fig, axes[:, c], name, grid)
    return fig


def _grid_column(fig: Any, axes: Any, name: str, grid: _Grid) -> None:
    """One column of :func:`figure_grid` (``axes`` top to bottom), with its colour bar."""
    images, drawn = grid.images, grid.drawn
    is_signed = grid.signed.get(name, True)
    column_lim = _limit(drawn[name], is_signed) if name in drawn else 1.0
    for r, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            heading = f"{name}\n(class-agnostic)" if name in grid.agnostic else name
            ax.set_title(heading, fontsize=8)
        if name == "input":
            ax.imshow(image_to_hwc(images, r))
            if grid.row_labels is not None:
                ax.set_ylabel(grid.row_labels[r], fontsize=7)
        elif name == "mask":
            ax.imshow(grid.masks[r].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            m = drawn[name][r]
            lim = column_lim if grid.scale == "column" else _limit(m, is_signed)
            _draw_map(ax, m, image_to_hwc(images, r) if grid.overlay else None, is_signed, lim)
    if name in drawn:
        cax = axes[-1].inset_axes((0.08, -0.16, 0.84, 0.07))
        _colourbar(
            fig,
            cax,
            is_signed,
            column_lim if grid.scale == "column" else None,
            grid.units.get(name),
        )


def _grid_caption_lines(grid: _Grid, note: str | None) -> list[str]:
    """The caption of :func:`figure_grid`: the colour convention, then ``note``, by line."""
    kinds = {grid.signed.get(name, True) for name in grid.drawn}
    caption = colour_note(kinds.pop() if len(kinds) == 1 else None, grid.scale)
    if note:
        caption += f"; {note}"
    return caption.split("\n")


def _grid_caption(fig: Any, grid: _Grid, cell: float, title: str | None, lines: list[str]):
    """Caption (``lines``), title and layout of :func:`figure_grid`."""
    height = _grid_height(cell, grid.images.shape[0], len(lines))
    fig.text(0.5, 0.005, "\n".join(lines), ha="center", va="bottom", fontsize=7, color="0.3")
    if title:
        fig.suptitle(title, fontsize=8)
    bottom = (0.3 + _CAPTION_LINE_IN * (len(lines) - 1)) / height
    top = 1 - (0.3 / height if title else 0.0)
    fig.tight_layout(rect=(0, bottom, 1, top))


def overlay_figure(
    attr: torch.Tensor,
    image: torch.Tensor,
    signed: bool,
    title: str,
    note: str | None = None,
    interpolation: Interpolation = "nearest",
    unit: str = "map value",
):
    """One map over its greyscale image, with a colour bar in the map's units and a caption.

    The map is drawn as Captum's ``blended_heat_map`` draws it (greyscale image, map at
    :data:`OVERLAY_ALPHA`) in the module's colours, on the scale ``±max|map|`` (signed) or
    ``0..max`` (non-negative); the caption is :func:`colour_note`, then ``note``.

    Args:
        attr: The map ``(1, h, w)`` (or ``(1, 1, h, w)``, ``(h, w)``); a map smaller than
            the image is upsampled with ``interpolation``.
        image: The input as shown to a person, ``(3, H, W)`` in [0, 1].
        signed: Draw both signs (:data:`SIGNED_CMAP`: green for the class, red against);
            otherwise values from 0 up (:data:`POSITIVE_CMAP`).
        title: Figure title.
        note: A sentence appended to the caption.
        interpolation: ``"nearest"`` or ``"bilinear"``.
        unit: The label of the colour bar: what one value of the map is
            (``captum_ext.registry.METHODS[name].unit``, e.g. ``"logit drop"`` for TAM).

    Returns:
        A ``matplotlib.figure.Figure`` of :data:`OVERLAY_INCHES` square; its colour bar is
        its second axes (``fig.axes[1]``, label ``unit``).
    """
    from matplotlib.figure import Figure

    picture = image_to_hwc(image[None] if image.dim() == 3 else image)
    m = _upsample(attr, picture.shape[:2], interpolation)
    lim = _limit(m, signed)
    fig = Figure(figsize=(OVERLAY_INCHES, OVERLAY_INCHES))
    ax = fig.add_axes((0.1, 0.24, 0.8, 0.68))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    _draw_map(ax, m, picture, signed, lim)
    _colourbar(fig, fig.add_axes((0.1, 0.15, 0.8, 0.03)), signed, lim, unit)
    caption = colour_note(signed, "map") + (f"; {note}" if note else "")
    fig.text(0.5, 0.02, caption, ha="center", va="bottom", fontsize=7, color="0.3", wrap=True)
    return fig


def save_overlay(
    path: Path | str,
    attr: torch.Tensor,
    image: torch.Tensor,
    signed: bool,
    title: str,
    note: str | None = None,
    unit: str = "map value",
):
    """Saves :func:`overlay_figure` of one map as a PNG of 400 x 400 pixels.

    Args:
        path: Output file.
        attr: The map ``(1, H, W)`` (or ``(1, 1, H, W)``, ``(H, W)``).
        image: The input as shown to a person, ``(3, H, W)`` in [0, 1].
        signed: Signed map (green for the class, red against) or non-negative.
        title: Figure title.
        note: A sentence appended to the caption.
        unit: The label of the colour bar (``captum_ext.registry.METHODS[name].unit``).

    Returns:
        The saved ``matplotlib.figure.Figure``.
    """
    fig = overlay_figure(attr, image, signed, title, note, unit=unit)
    fig.savefig(path, dpi=OVERLAY_DPI)
    return fig


@dataclass
class TextRow:
    """One row of :func:`text_figure`.

    Attributes:
        label: Text at the left of the row.
        tokens: The tokens, in order.
        scores: One score per token ``(T,)``.
        signed: :data:`SIGNED_CMAP` centred at 0 (else :data:`POSITIVE_CMAP` from 0).
        marked: Tokens to outline (e.g. a planted rationale), one bool per token.
    """

    label: str
    tokens: Sequence[str]
    scores: torch.Tensor
    signed: bool
    marked: Sequence[bool] | None = None


def _as_text_row(row: Any) -> TextRow:
    """``row`` as a :class:`TextRow`; a Captum ``VisualizationDataRecord`` is converted."""
    if isinstance(row, TextRow):
        return row
    from captum.attr import visualization as viz

    if isinstance(row, viz.VisualizationDataRecord):
        return TextRow(
            label=str(row.attr_class),
            tokens=list(row.raw_input_ids),
            scores=torch.as_tensor(row.word_attributions, dtype=torch.float64).reshape(-1),
            signed=True,
        )
    raise TypeError(
        f"text_figure: rows must be TextRow or captum VisualizationDataRecord objects, "
        f"got {type(row).__name__}"
    )


_CHAR_IN = 0.075  # width of one character of 9 pt monospace, in inches
_LINE_IN = 0.32
_WRAP = 90  # characters of tokens per line


def _text_colour(v: float, lim: float, signed: bool) -> tuple:
    value = (v / lim + 1) / 2 if signed else max(v, 0.0) / lim
    return cmap_for(signed)(float(np.clip(value, 0.0, 1.0)))


def text_figure(
    rows: Sequence[TextRow],
    title: str | None = None,
    note: str | None = None,
    exclude_special: bool = True,
):
    """Tokens drawn as coloured boxes, one row (wrapped if long) per map.

    Colours follow the module's convention; each row is scaled by its own maximum
    absolute score. A legend line (the colours of ``−max``, 0 and ``+max``) and a
    caption (:func:`colour_note`, then ``note``) state it.

    Args:
        rows: The maps: :class:`TextRow` objects, or Captum
            ``VisualizationDataRecord`` objects (as :func:`text_record` returns; drawn signed,
            labelled with their attribution class).
        title: Figure title.
        note: A sentence appended to the caption.
        exclude_special: Special tokens (:func:`is_special_token`: ``[CLS]``, ``[SEP]``,
            padding) are drawn but do not set their row's scale (their colour is
            clipped at the scale's end).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        TypeError: A row that is neither (the message names its type).
    """
    from matplotlib.figure import Figure

    rows = [_as_text_row(r) for r in rows]
    label_w = max((len(r.label) for r in rows), default=0) + 2
    lines = _text_lines(rows, exclude_special)
    caption = _text_caption(rows, exclude_special, note)
    width_chars = max(
        label_w + max((c[-1][0] + len(c[-1][1]) + 1.5 for _, c in lines if c), default=10),
        len(title or "") * 1.1,  # bold proportional text, a little wider than monospace
        len(caption) * 0.75,  # 7 pt proportional text
    )
    extra = (1 if title else 0) + 2  # the legend and the caption
    fig = Figure(figsize=(width_chars * _CHAR_IN + 0.3, (len(lines) + extra) * _LINE_IN + 0.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.5, width_chars + 0.5)
    ax.set_ylim(len(lines) + extra - 0.2, -0.8)
    ax.axis("off")
    y0 = 0
    if title:
        ax.text(0, 0, title, fontsize=9, fontweight="bold", va="center")
        y0 = 1
    for i, (label, cells) in enumerate(lines):
        y = y0 + i
        ax.text(0, y, label, fontsize=8, va="center", family="monospace")
        for x, tok, colour, m in cells:
            _token_box(ax, label_w + x, y, tok, colour, m)
    y = y0 + len(lines)
    _text_legend(ax, rows, y, label_w)
    ax.text(0, y + 1, caption, fontsize=7, va="center", color="0.3")
    return fig


def _text_lines(
    rows: Sequence[TextRow], exclude_special: bool
) -> list[tuple[str, list[tuple[float, str, tuple, bool]]]]:
    """Rows wrapped into lines of ``(label, [(x, token, colour, outlined), ...])``."""
    lines: list[tuple[str, list[tuple[float, str, tuple, bool]]]] = []
    for row in rows:
        s = row.scores.detach().double().cpu().numpy()
        lim = _limit(_scale_values(s, list(row.tokens), exclude_special), row.signed)
        marked = list(row.marked) if row.marked is not None else [False] * len(row.tokens)
        x, cells, label = 0.0, [], row.label
        for tok, v, m in zip(row.tokens, s, marked):
            width = len(tok) + 1.5
            if x + width > _WRAP and cells:
                lines.append((label, cells))
                x, cells, label = 0.0, [], ""
            cells.append((x, tok, _text_colour(float(v), lim, row.signed), m))
            x += width
        lines.append((label, cells))
    return lines


def _text_caption(rows: Sequence[TextRow], exclude_special: bool, note: str | None) -> str:
    """The caption of :func:`text_figure`: the colour convention, then ``note``."""
    kinds = {row.signed for row in rows}
    caption = colour_note(kinds.pop() if len(kinds) == 1 else None, "row")
    if exclude_special:
        caption += "; [CLS], [SEP] and padding do not set the scale"
    if note:
        caption += f"; {note}"
    return caption


def _token_box(ax: Any, x: float, y: float, tok: str, colour: tuple, outlined: bool) -> None:
    """``tok`` in a rounded box of ``colour`` (outlined in black when ``outlined``)."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ax.text(
        x,
        y,
        tok,
        fontsize=9,
        va="center",
        family="monospace",
        color="white" if luminance < 0.45 else "black",
        bbox=dict(
            boxstyle="round,pad=0.2",
            fc=colour,
            ec="black" if outlined else "none",
            lw=1.2 if outlined else 0,
        ),
    )


def _text_legend(ax: Any, rows: Sequence[TextRow], y: float, label_w: int) -> None:
    """The legend line of :func:`text_figure` at height ``y``: the colours of its scales."""
    legend: list[tuple[str, tuple | None]] = []
    if any(row.signed for row in rows):
        legend += [("signed:", None), ("−max", SIGNED_CMAP(0.0)), ("0", SIGNED_CMAP(0.5))]
        legend += [("+max", SIGNED_CMAP(1.0))]
    if not all(row.signed for row in rows):
        legend += [("never negative:", None), ("0", POSITIVE_CMAP(0.0))]
        legend += [("max", POSITIVE_CMAP(1.0))]
    ax.text(0, y, "colours", fontsize=8, va="center", family="monospace", color="0.3")
    x = float(label_w)
    for text, colour in legend:
        if colour is None:
            ax.text(x, y, text, fontsize=8, va="center", family="monospace", color="0.3")
            x += len(text) + 1
        else:
            _token_box(ax, x, y, text, colour, False)
            x += len(text) + 2
        x += 0.5
