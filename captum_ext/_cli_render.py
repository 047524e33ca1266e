"""Figures written by ``captum-ext``: Captum overlays of image maps and token-box rows of text maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "OVERLAY_DPI",
    "OVERLAY_INCHES",
    "TextRow",
    "save_overlay",
    "text_figure",
]

OVERLAY_INCHES = 5
OVERLAY_DPI = 80  # overlays are OVERLAY_INCHES * OVERLAY_DPI = 400 pixels square


def save_overlay(
    path: Path, attr: torch.Tensor, image: torch.Tensor, signed: bool, title: str
) -> None:
    """Saves Captum's ``blended_heat_map`` of one map over its image as a PNG.

    Args:
        path: Output file.
        attr: The map ``(1, H, W)`` (or ``(1, 1, H, W)``).
        image: The input as shown to a person, ``(3, H, W)`` in [0, 1].
        signed: Draw both signs (Captum ``sign="all"``, ``bwr`` centred at 0: red for the
            class, blue against); otherwise ``sign="positive"`` (Captum's greens).
        title: Figure title.
    """
    from captum.attr import visualization

    from captum_ext.viz import image_to_hwc, to_hwc

    fig, _ = visualization.visualize_image_attr(
        to_hwc(attr if attr.dim() == 4 else attr[None]),
        image_to_hwc(image[None]),
        method="blended_heat_map",
        sign="all" if signed else "positive",
        cmap="bwr" if signed else None,  # as the demo grids: red for, blue against
        show_colorbar=True,
        title=title,
        fig_size=(OVERLAY_INCHES, OVERLAY_INCHES),
        use_pyplot=False,
    )
    fig.savefig(path, dpi=OVERLAY_DPI)


@dataclass
class TextRow:
    """One row of :func:`text_figure`.

    Attributes:
        label: Text at the left of the row.
        tokens: The tokens, in order.
        scores: One score per token ``(T,)``.
        signed: Diverging colours centred at 0 (else white to red from 0 to the maximum).
        marked: Tokens to outline (e.g. a planted rationale), one bool per token.
    """

    label: str
    tokens: Sequence[str]
    scores: torch.Tensor
    signed: bool
    marked: Sequence[bool] | None = None


_CHAR_IN = 0.075  # width of one character of 9 pt monospace, in inches
_LINE_IN = 0.32
_WRAP = 90  # characters of tokens per line


def text_figure(rows: Sequence[TextRow], title: str | None = None, note: str | None = None):
    """Tokens drawn as coloured boxes, one row (wrapped if long) per map.

    Each row is scaled by its own maximum absolute score; signed rows use ``bwr``
    centred at 0, unsigned rows ``Reds`` from 0.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    label_w = max((len(r.label) for r in rows), default=0) + 2
    lines: list[tuple[str, list[tuple[float, str, tuple, bool]]]] = []
    for row in rows:
        s = row.scores.detach().double().cpu().numpy()
        lim = float(np.abs(s).max()) or 1.0
        cmap = colormaps["bwr" if row.signed else "Reds"]
        marked = list(row.marked) if row.marked is not None else [False] * len(row.tokens)
        x, cells, label = 0.0, [], row.label
        for tok, v, m in zip(row.tokens, s, marked):
            width = len(tok) + 1.5
            if x + width > _WRAP and cells:
                lines.append((label, cells))
                x, cells, label = 0.0, [], ""
            value = (v / lim + 1) / 2 if row.signed else max(v, 0.0) / lim
            cells.append((x, tok, cmap(float(value)), m))
            x += width
        lines.append((label, cells))
    width_chars = max(
        label_w + max((c[-1][0] + len(c[-1][1]) + 1.5 for _, c in lines if c), default=10),
        len(title or "") * 1.1,  # bold proportional text, a little wider than monospace
        len(note or "") * 0.75,  # 7 pt proportional text
    )
    extra = (1 if title else 0) + (1 if note else 0)
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
            luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
            ax.text(
                label_w + x,
                y,
                tok,
                fontsize=9,
                va="center",
                family="monospace",
                color="white" if luminance < 0.45 else "black",
                bbox=dict(
                    boxstyle="round,pad=0.2",
                    fc=colour,
                    ec="black" if m else "none",
                    lw=1.2 if m else 0,
                ),
            )
    if note:
        ax.text(0, y0 + len(lines), note, fontsize=7, va="center", color="0.3")
    return fig
