"""From token and patch maps to Captum's visualisation inputs, and figure grids.

Captum's ``visualize_image_attr`` wants ``(H, W, C)`` numpy arrays and
``visualize_text`` wants ``VisualizationDataRecord``s; these helpers convert
captum_ext's ``(B, 1, H, W)`` and ``(B, T)`` maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["figure_grid", "html_text", "image_to_hwc", "text_record", "to_hwc"]


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
):
    """A ``captum.attr.visualization.VisualizationDataRecord`` for one text map ``(T,)``.

    Scores are divided by their maximum absolute value (Captum's colour
    scale spans [-1, 1]); positions where ``mask`` is 0 are dropped.
    """
    from captum.attr import visualization as viz

    s = scores.detach().double().cpu()
    toks = list(tokens)
    if mask is not None:
        keep = mask.bool().cpu()
        s = s[keep]
        toks = [t for t, k in zip(toks, keep.tolist()) if k]
    denom = s.abs().max()
    norm = s / denom if denom > 0 else s
    return viz.VisualizationDataRecord(
        norm, pred_prob, pred_class, true_class, attr_class, float(s.sum()), toks, None
    )


def html_text(records: Sequence[Any]) -> str:
    """HTML of ``captum.attr.visualization.visualize_text`` for the records, as a string."""
    import contextlib
    import io

    from captum.attr import visualization as viz

    # Captum calls IPython's display(), which prints a repr outside notebooks.
    with contextlib.redirect_stdout(io.StringIO()):
        return viz.visualize_text(list(records), legend=True).data


def figure_grid(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    row_labels: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    signed: Mapping[str, bool] | None = None,
    cell: float = 1.6,
):
    """A matplotlib figure: one row per image, columns input, mask and each method.

    Args:
        images: ``(R, 3, H, W)`` in [0, 1], one per row (repeat an image for
            several targets).
        maps: Method name to ``(R, 1, H, W)`` maps.
        row_labels: Text at the left of each row (e.g. the target class).
        masks: ``(R, H, W)`` ground-truth masks (a column is added).
        signed: Method name to whether its map is signed; signed maps use a
            diverging colormap centred at 0 (``bwr``), others ``viridis``.
            Each cell is scaled by its own maximum absolute value.
        cell: Cell size in inches.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    import matplotlib.pyplot as plt

    signed = dict(signed or {})
    cols = ["input"] + (["mask"] if masks is not None else []) + list(maps)
    rows = images.shape[0]
    fig, axes = plt.subplots(
        rows, len(cols), figsize=(cell * len(cols), cell * rows), squeeze=False
    )
    for r in range(rows):
        for c, name in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if name == "input":
                ax.imshow(image_to_hwc(images, r))
                if row_labels is not None:
                    ax.set_ylabel(row_labels[r], fontsize=7)
            elif name == "mask":
                ax.imshow(masks[r].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                m = maps[name][r].detach().double().cpu().reshape(images.shape[-2:]).numpy()
                lim = float(np.abs(m).max()) or 1.0
                if signed.get(name, True):
                    ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
                else:
                    ax.imshow(m, cmap="viridis", vmin=min(0.0, float(m.min())), vmax=lim)
    fig.tight_layout()
    return fig
