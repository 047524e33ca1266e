"""One visual language: every figure uses ``captum_ext.viz``'s colours and states its scale.

Signed maps: green = for the class, red = against, white = 0 (Captum's convention);
non-negative maps: white to green. Checked on the colormaps of the drawn images and on
rendered pixels of ``figure_grid``, ``save_overlay`` PNGs and ``text_figure``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext import viz
from captum_ext.viz import (
    POSITIVE_CMAP,
    SIGNED_CMAP,
    TextRow,
    colour_note,
    figure_grid,
    overlay_figure,
    save_overlay,
    text_figure,
    text_record,
)

H = W = 16


def _greenish(rgb) -> bool:
    r, g, b = (float(v) for v in rgb[:3])
    return g > r + 0.05 and g > b + 0.05


def _reddish(rgb) -> bool:
    r, g, b = (float(v) for v in rgb[:3])
    return r > g + 0.05 and r > b + 0.05


def _same_colours(a, b) -> bool:
    xs = np.linspace(0, 1, 11)
    return np.allclose(a(xs), b(xs), atol=1e-6)


def _split_map(rows: int = 1, grid: int = H) -> torch.Tensor:
    """``(rows, 1, grid, grid)``: +1 on the left half, -1 on the right half."""
    m = torch.ones(rows, 1, grid, grid)
    m[..., grid // 2 :] = -1.0
    return m


def _grey(rows: int = 1) -> torch.Tensor:
    return torch.full((rows, 3, H, W), 0.5)


def _pixel(fig, ax, col: float, row: float) -> np.ndarray:
    """RGB in [0, 1] of the rendered figure at data point (col, row) of an imshow axes."""
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())
    x, y = ax.transData.transform((col, row))
    return buf[round(float(buf.shape[0] - y)), round(float(x)), :3] / 255.0


def _map_image(ax):
    """The map's AxesImage of a cell (the last one drawn; under it, an overlay's image)."""
    return ax.get_images()[-1]


# --- the convention, defined once ---------------------------------------------------------


def test_convention_is_captums_green_for_red_against_white_zero():
    from captum.attr import visualization

    assert _reddish(SIGNED_CMAP(0.0)) and _greenish(SIGNED_CMAP(1.0))
    assert np.allclose(SIGNED_CMAP(0.5)[:3], 1.0, atol=0.01)  # white at 0
    assert np.allclose(POSITIVE_CMAP(0.0)[:3], 1.0, atol=0.05) and _greenish(POSITIVE_CMAP(1.0))
    # the same colours Captum's own image views use for sign="all" and sign="positive"
    attr = np.linspace(-1, 1, 16).reshape(4, 4, 1)
    for sign, ours in (("all", SIGNED_CMAP), ("positive", POSITIVE_CMAP)):
        _, ax = visualization.visualize_image_attr(
            attr, method="heat_map", sign=sign, use_pyplot=False
        )
        assert _same_colours(ax.get_images()[0].get_cmap(), ours), sign
    assert viz.cmap_for(True) is SIGNED_CMAP and viz.cmap_for(False) is POSITIVE_CMAP


def test_colour_note_states_the_convention():
    assert "green = evidence for the class" in colour_note(True)
    assert "red = against" in colour_note(None)
    assert "±max|map| per row" in colour_note(True, "row")
    assert "red" not in colour_note(False)


# --- figure_grid -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", [False, True])
def test_figure_grid_positive_is_green_negative_red(overlay):
    maps = {"CDAM": _split_map(), "Relevance": _split_map().clamp(min=0)}
    signed = {"CDAM": True, "Relevance": False}
    options = {"overlay": True} if overlay else {}  # the default draws the map alone
    fig = figure_grid(_grey(), maps, signed=signed, **options)
    axes = fig.axes
    cdam, rel = axes[1], axes[2]
    assert _same_colours(_map_image(cdam).get_cmap(), SIGNED_CMAP)
    assert _same_colours(_map_image(rel).get_cmap(), POSITIVE_CMAP)
    assert _greenish(_pixel(fig, cdam, 3, 8))  # +1
    assert _reddish(_pixel(fig, cdam, 12, 8))  # -1
    assert _greenish(_pixel(fig, rel, 3, 8))
    assert not _reddish(_pixel(fig, rel, 12, 8))  # 0: white (or the grey image)


def test_figure_grid_has_a_colour_bar_per_map_column_and_a_caption():
    maps = {"CDAM": _split_map(2), "Rollout": _split_map(2).abs()}
    signed = {"CDAM": True, "Rollout": False}
    fig = figure_grid(_grey(2), maps, masks=torch.zeros(2, H, W), signed=signed)
    bottom = fig.axes[-3:]  # last row: mask, CDAM, Rollout
    bars = [[c for c in ax.child_axes] for ax in bottom]
    assert [len(b) for b in bars] == [0, 1, 1]
    labels = [[t.get_text() for t in b[0].get_xticklabels()] for b in bars[1:]]
    assert labels == [["−max", "0", "+max"], ["0", "max"]]
    captions = [t.get_text() for t in fig.texts]
    assert any(colour_note(None, "cell") in c for c in captions)


def test_figure_grid_column_scale_labels_the_bars_in_map_units():
    maps = {"CDAM": torch.cat([_split_map(), 3 * _split_map()])}
    fig = figure_grid(_grey(2), maps, scale="column")
    bar = fig.axes[-1].child_axes[0]
    assert [t.get_text() for t in bar.get_xticklabels()] == ["-3", "0", "3"]
    first = _map_image(fig.axes[1])  # row 0, drawn on the column's scale: ±3
    assert first.get_clim() == (-3.0, 3.0)
    assert any("per column" in t.get_text() for t in fig.texts)


def test_figure_grid_class_agnostic_columns_are_titled_so():
    maps = {"CDAM": _split_map(), "Rollout": _split_map().abs()}
    fig = figure_grid(
        _grey(), maps, row_labels=["circle (sigmoid 0.97)"], class_agnostic=["Rollout"]
    )
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[1] == "CDAM"
    assert "class-agnostic" in titles[2] and titles[2].startswith("Rollout")
    assert fig.axes[0].get_ylabel() == "circle (sigmoid 0.97)"


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("overlay", [False, True])
def test_figure_grid_upsamples_grid_maps_to_the_image(overlay, interpolation):
    grid = torch.arange(16.0).reshape(1, 1, 4, 4) - 7.5  # a patch grid (R, 1, h, w)
    fig = figure_grid(_grey(), {"CDAM": grid}, overlay=overlay, interpolation=interpolation)
    images = fig.axes[1].get_images()
    assert len(images) == (2 if overlay else 1)  # greyscale image under the map
    assert all(im.get_array().shape == (H, W) for im in images)
    drawn = np.asarray(_map_image(fig.axes[1]).get_array())
    if interpolation == "nearest":  # patch cells stay blocks of 4 x 4 pixels
        expected = np.kron(grid[0, 0].numpy(), np.ones((4, 4)))
        np.testing.assert_allclose(drawn, expected)
    else:  # smooth: more distinct values than patches, the same range
        assert len(np.unique(drawn)) > 16
        assert drawn.min() >= -7.5 and drawn.max() <= 7.5
    if overlay:
        assert images[-1].get_alpha() == viz.OVERLAY_ALPHA


def test_figure_grid_rejects_an_unknown_interpolation():
    with pytest.raises(ValueError, match="bilinear"):
        figure_grid(_grey(), {"CDAM": _split_map(grid=4)}, interpolation="bicubic")


# --- save_overlay ----------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_save_overlay_png_is_green_for_and_red_against(tmp_path, sign):
    attr = torch.full((1, H, W), sign)
    attr[0, 0, 0] = -sign / 10  # a small value of the other sign sets no colour of note
    path = tmp_path / "o.png"
    save_overlay(path, attr, _grey()[0], True, "CDAM: circle (sigmoid 0.97)")
    with Image.open(path) as img:
        assert img.size == (400, 400)
        rgb = np.asarray(img.convert("RGB"), dtype=float) / 255.0
    g = (rgb[..., 1] > rgb[..., 0] + 0.15) & (rgb[..., 1] > rgb[..., 2] + 0.15)
    r = (rgb[..., 0] > rgb[..., 1] + 0.15) & (rgb[..., 0] > rgb[..., 2] + 0.15)
    more, fewer = (g, r) if sign > 0 else (r, g)
    assert more.sum() > 0.2 * g.size  # the map's area, not just the colour bar
    assert more.sum() > 10 * max(fewer.sum(), 1)


def test_overlay_figure_has_a_colour_bar_in_map_units_and_a_caption():
    fig = overlay_figure(2.5 * _split_map()[0], _grey()[0], True, "CDAM: circle")
    main, bar = fig.axes
    assert _same_colours(_map_image(main).get_cmap(), SIGNED_CMAP)
    assert _map_image(main).get_clim() == (-2.5, 2.5)
    assert [t.get_text() for t in bar.get_xticklabels()] == ["-2.5", "0", "2.5"]
    assert any(colour_note(True, "map") in t.get_text() for t in fig.texts)
    fig = overlay_figure(_split_map()[0].abs(), _grey()[0], False, "Rollout (class-agnostic)")
    assert _same_colours(_map_image(fig.axes[0]).get_cmap(), POSITIVE_CMAP)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["0", "1"]


# --- text ------------------------------------------------------------------------------------

TOKENS = ["[CLS]", "good", "bad", "film", "[SEP]"]
SCORES = torch.tensor([100.0, 2.0, -2.0, 0.0, 50.0])  # a huge score on the special tokens


def _boxes(fig) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for t in fig.axes[0].texts:
        patch = t.get_bbox_patch()
        if patch is not None:
            out.setdefault(t.get_text(), []).append(tuple(patch.get_facecolor()))
    return out


def test_text_figure_green_for_red_against_and_special_tokens_do_not_set_the_scale():
    fig = text_figure([TextRow("CDAM", TOKENS, SCORES, True)])
    boxes = _boxes(fig)
    assert np.allclose(boxes["good"][0], SIGNED_CMAP(1.0))  # full green: 2 is the max
    assert np.allclose(boxes["bad"][0], SIGNED_CMAP(0.0))  # full red
    assert np.allclose(boxes["film"][0], SIGNED_CMAP(0.5))  # white
    assert np.allclose(boxes["[CLS]"][0], SIGNED_CMAP(1.0))  # drawn, clipped
    washed = _boxes(text_figure([TextRow("CDAM", TOKENS, SCORES, True)], exclude_special=False))
    assert np.allclose(washed["good"][0], SIGNED_CMAP(0.51))  # 2 / 100: almost white


def test_text_figure_non_negative_rows_and_the_stated_convention():
    scores = torch.tensor([1.0, 0.5, 0.0, 0.25, 1.0])
    fig = text_figure([TextRow("Relevance", TOKENS, scores, False)], note="outlined: rationale")
    boxes = _boxes(fig)
    assert np.allclose(boxes["good"][0], POSITIVE_CMAP(1.0))  # [CLS] (1.0) sets no scale
    assert np.allclose(boxes["film"][0], POSITIVE_CMAP(0.5))
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert colour_note(False, "row") in texts and "outlined: rationale" in texts
    assert "max" in boxes  # the legend's swatches
    fig = text_figure([TextRow("CDAM", TOKENS, SCORES, True)])
    assert colour_note(True, "row") in " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "−max" in _boxes(fig) and "+max" in _boxes(fig)


def test_text_record_special_tokens_do_not_set_the_scale():
    rec = text_record(SCORES, TOKENS, 0.9, "pos", "pos", "pos (CDAM)")
    assert rec.word_attributions.tolist() == [1.0, 1.0, -1.0, 0.0, 1.0]
    rec = text_record(SCORES, TOKENS, 0.9, "pos", "pos", "pos (CDAM)", exclude_special=False)
    assert rec.word_attributions[1] == pytest.approx(0.02)
    assert rec.attr_score == pytest.approx(150.0)  # the raw sum, as before


@pytest.mark.parametrize(
    ("token", "special"),
    [
        ("[CLS]", True),
        ("[SEP]", True),
        ("[PAD]", True),
        ("<s>", True),
        ("</s>", True),
        ("<pad>", True),
        ("[UNK]", False),
        ("good", False),
        ("<", False),
        ("[", False),
    ],
)
def test_is_special_token(token, special):
    assert viz.is_special_token(token) is special


def test_html_text_states_the_convention():
    html = viz.html_text([text_record(SCORES, TOKENS, 0.9, "pos", "pos", "pos (CDAM)")])
    assert "green = evidence for the class, red = against" in html
    assert "hsl(120" in html and "hsl(0" in html  # Captum's green and red


def test_text_figure_draws_captum_records_from_text_record():
    """text_record's Captum record goes straight into text_figure (it used to crash)."""
    import torch

    from captum_ext.viz import TextRow, text_figure, text_record

    tokens = ["[CLS]", "good", "film", "[SEP]"]
    scores = torch.tensor([0.1, 2.0, -1.0, 0.0])
    record = text_record(scores, tokens, 0.9, "pos", "pos", "pos")
    fig = text_figure([record])
    as_row = text_figure([TextRow("pos", tokens, record.word_attributions, True)])
    drawn = [t.get_text() for t in fig.axes[0].texts]
    assert drawn == [t.get_text() for t in as_row.axes[0].texts] and "good" in " ".join(drawn)
    with pytest.raises(TypeError, match="got dict"):
        text_figure([{"tokens": tokens}])
