"""Map alignment: tokens and cells sit over exactly their pixels; peaks measured from centroids.

Slow literal float64 references (pixel loops) for ``peak_offset`` and for the evaluation's
token <-> pixel mappings (``to_pixels``, ``to_grid``), including a model that pads its last
row/column of patches (timm ``dynamic_img_pad``), where the evaluation used to stretch the
token grid over the image. The measurements behind this file are in ``docs/alignment.md``.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution

from captum_ext.data import shapes
from captum_ext.evaluation import EvalConfig, _maps
from captum_ext.evaluation._images import ImageSet
from captum_ext.explainers.ttame import _format
from captum_ext.metrics import peak_offset, pointing_game
from captum_ext.registry import make_method


def _peak_offset_loop(a: torch.Tensor, m: torch.Tensor) -> list[list[float]]:
    """Literal reference: tied maxima's mean (x = column, y = row) minus the mask centroid."""
    out = []
    for b in range(a.shape[0]):
        top = max(float(v) for v in a[b].flatten())
        peak = [(j, i) for i in range(a.shape[1]) for j in range(a.shape[2]) if a[b, i, j] == top]
        obj = [(j, i) for i in range(a.shape[1]) for j in range(a.shape[2]) if m[b, i, j]]
        if not obj:
            out.append([float("nan")] * 2)
            continue
        px = sum(p[0] for p in peak) / len(peak)
        py = sum(p[1] for p in peak) / len(peak)
        cx = sum(p[0] for p in obj) / len(obj)
        cy = sum(p[1] for p in obj) / len(obj)
        out.append([px - cx, py - cy])
    return out


def test_peak_offset_matches_a_float64_literal_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (6, 9, 11), generator=g).double()  # many tied maxima
    m = torch.rand(6, 9, 11, generator=g) < 0.3
    m[5] = False
    got = peak_offset(a, m)
    ref = torch.tensor(_peak_offset_loop(a, m), dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12, equal_nan=True)


def test_ideal_maps_of_the_shapes_data_are_centred():
    """The data's geometry alone: the mask is its own centre; a cell-average map upsampled
    nearest peaks at the object's cell centre, which is the object's centre on average."""
    d = shapes(256, 3, layout="aligned", max_objects=2, size=32, patch=8)
    pi, pc = torch.nonzero(d.labels > 0.5, as_tuple=True)
    m = d.masks[pi, pc]
    assert peak_offset(m.double(), m).abs().max().item() == 0.0
    # the square's mask is exactly its box: its centroid is the box centre (top + (s - 1) / 2)
    for (i, c), row in zip(zip(pi.tolist(), pc.tolist()), m):
        (obj,) = [o for o in d.params[i].objects if o.class_index == c]
        if c == 0:
            ys, xs = torch.nonzero(row, as_tuple=True)
            assert ys.double().mean().item() == obj.top + (obj.extent - 1) / 2
            assert xs.double().mean().item() == obj.left + (obj.extent - 1) / 2
    ideal = _maps.to_pixels(_maps.to_grid(m, (4, 4), (8, 8)), (32, 32), (8, 8))
    off = peak_offset(ideal, m)
    # objects are placed uniformly inside their cells: no systematic shift (measured +-0.2)
    assert off.mean(0).abs().max().item() < 0.35


def test_to_pixels_puts_every_token_over_its_patch_literal():
    g = torch.Generator().manual_seed(1)
    for (h, w), (ph, pw), (H, W) in [((4, 4), (8, 8), (32, 32)), ((5, 3), (8, 6), (33, 14))]:
        grid = torch.rand(2, h, w, generator=g, dtype=torch.float64)
        up = _maps.to_pixels(grid, (H, W), (ph, pw))
        assert up.shape == (2, H, W) and up.dtype == torch.float64
        for i in range(H):
            for j in range(W):
                assert torch.equal(up[:, i, j], grid[:, i // ph, j // pw])


def test_to_pixels_refuses_a_grid_that_is_no_whole_number_of_cells():
    with pytest.raises(ValueError, match="pass patch"):
        _maps.to_pixels(torch.zeros(1, 5, 5), (33, 33))
    for patch in [(6, 6), (9, 9)]:  # 5 tokens of 6 px fall short, of 9 px overshoot 33 px
        with pytest.raises(ValueError, match="does not cover"):
            _maps.to_pixels(torch.zeros(1, 5, 5), (33, 33), patch)
    assert _maps.to_pixels(torch.ones(1, 4, 4), (32, 32)).shape == (1, 32, 32)


def test_to_grid_pools_the_pixels_of_each_token_literal():
    g = torch.Generator().manual_seed(2)
    H, W, (ph, pw), (h, w) = 33, 14, (8, 6), (5, 3)
    maps = torch.rand(2, H, W, generator=g, dtype=torch.float64)
    mean = _maps.to_grid(maps, (h, w), (ph, pw))
    peak = _maps.to_grid(maps, (h, w), (ph, pw), reduce="max")
    for i in range(h):
        for j in range(w):
            cell = maps[:, i * ph : min((i + 1) * ph, H), j * pw : min((j + 1) * pw, W)]
            torch.testing.assert_close(mean[:, i, j].double(), cell.mean((1, 2)), atol=1e-6, rtol=0)
            torch.testing.assert_close(peak[:, i, j].double(), cell.amax((1, 2)), atol=1e-6, rtol=0)
    # whole cells: the adaptive pooling the evaluation always used, unchanged
    full = maps[:, :32, :12]
    assert torch.equal(
        _maps.to_grid(full, (4, 2), (8, 6)),
        F.adaptive_avg_pool2d(full[:, None].float(), (4, 2))[:, 0],
    )
    with pytest.raises(ValueError, match="reduce"):
        _maps.to_grid(maps, (h, w), (ph, pw), reduce="sum")


def _padding_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=4,
        dynamic_img_size=True,
        dynamic_img_pad=True,
    ).eval()


def test_evaluation_maps_of_a_padding_vit_are_the_methods_own_maps():
    """33-px images, 8-px patches: the model pads to 40 px and has a 5x5 grid. The
    evaluation's pixel maps must be the method's own ``output="input"`` maps (token (i, j) over
    pixels [8i, 8i + 8)), and the grid masks the tokens' own pixels. The old code stretched the
    grid over the image (7-px cells: token 3 over pixels 21..27 instead of 24..31)."""
    model = _padding_vit()
    data = shapes(4, 0, layout="free", size=33)
    items = ImageSet(model, data, EvalConfig(n=4), "sigmoid")
    assert items.grid == (5, 5)
    tam = make_method("tam", model)
    pixels, grids = items.method_map(tam, False)()
    own = tam.attribute(items.inputs, target=items.targets, output="input")[:, 0]
    assert torch.equal(pixels, own.float())
    pair = data.masks[items.pi, items.pc]
    for i in range(5):
        for j in range(5):
            cell = pair[:, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].flatten(1).any(1)
            assert torch.equal(items.masks[:, i, j].cpu(), cell)
    assert _maps.model_patch(model) == (8, 8)
    torch.testing.assert_close(_maps.to_grid(pixels, items.grid, (8, 8)), grids)


@pytest.mark.parametrize("c", [1, 2])
def test_bilinear_upsampling_of_a_cell_peaks_at_the_cell_centre(c):
    """T-TAME (``_format``) and Captum GradCAM (``LayerAttribution.interpolate``) upsample with
    ``align_corners=False``: an interior cell's value peaks at its centre, pixels 8c + 3 and
    8c + 4 tied (offset 0 from the cell's centroid 8c + 3.5)."""
    grid = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    grid[0, 0, c, c] = 1.0
    cell = torch.zeros(1, 32, 32, dtype=torch.bool)
    cell[0, 8 * c : 8 * c + 8, 8 * c : 8 * c + 8] = True
    x = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    for up in (_format(grid, x, "input"), LayerAttribution.interpolate(grid, (32, 32), "bilinear")):
        assert peak_offset(up[:, 0], cell).tolist() == [[0.0, 0.0]]
    # align_corners=True would stretch the grid: the cell's peak moves off its centre
    shifted = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=True)
    assert peak_offset(shifted[:, 0], cell).abs().max().item() > 0.5


def _bilinear_loop(grid: torch.Tensor, ph: int, pw: int, H: int, W: int) -> torch.Tensor:
    """Literal reference: pixel (i, j) samples the grid at ((i + 0.5) / ph - 0.5, (j + 0.5) /
    pw - 0.5), clamped to the grid, with bilinear weights (align_corners=False)."""
    h, w = grid.shape[-2:]
    out = torch.zeros(grid.shape[0], H, W, dtype=torch.float64)
    for i in range(H):
        y = min(max((i + 0.5) / ph - 0.5, 0.0), h - 1)
        y0 = int(y)
        y1, ly = min(y0 + 1, h - 1), y - y0
        for j in range(W):
            x = min(max((j + 0.5) / pw - 0.5, 0.0), w - 1)
            x0 = int(x)
            x1, lx = min(x0 + 1, w - 1), x - x0
            out[:, i, j] = (
                (1 - ly) * (1 - lx) * grid[:, y0, x0]
                + (1 - ly) * lx * grid[:, y0, x1]
                + ly * (1 - lx) * grid[:, y1, x0]
                + ly * lx * grid[:, y1, x1]
            )
    return out


def test_bilinear_token_maps_for_pixel_localisation_literal():
    """The standard pointing game and the peak offset read token maps upsampled bilinearly,
    token centres at patch centres, cropped like ``to_pixels`` when the model pads."""
    g = torch.Generator().manual_seed(3)
    for (h, w), (ph, pw), (H, W) in [((4, 4), (8, 8), (32, 32)), ((5, 3), (8, 6), (33, 14))]:
        grid = torch.rand(2, h, w, generator=g, dtype=torch.float64)
        up = _maps.to_pixels_bilinear(grid, (H, W), (ph, pw))
        assert up.shape == (2, H, W) and up.dtype == torch.float64
        torch.testing.assert_close(up, _bilinear_loop(grid, ph, pw, H, W), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="pass patch"):
        _maps.to_pixels_bilinear(torch.zeros(1, 5, 5), (33, 33))


def test_standard_pointing_reads_every_token_method_through_one_upsampling():
    """A token method's nearest-upsampled map ties a whole patch at its maximum; the pixel
    localisation columns read the bilinear map instead, which T-TAME's own output already is:
    one upsampling for every method on the transformer."""
    from captum_ext.evaluation._table import IMAGE_TABLE

    model = _padding_vit()
    data = shapes(4, 0, layout="free", size=33)
    items = ImageSet(model, data, EvalConfig(n=4), "sigmoid")
    tam = make_method("tam", model)
    raw = items.method_map(tam, False)()
    ctx = items.context("tam", raw, {})
    assert torch.equal(ctx.pixels, raw[0].to(ctx.pixels.device))  # faithfulness: own maps
    want = _maps.to_pixels_bilinear(raw[1], (33, 33), (8, 8))
    assert torch.equal(ctx.point_pixels, want)
    assert not torch.equal(ctx.point_pixels, ctx.pixels)
    column = {m.name: m for m in IMAGE_TABLE}["pointing_game"]
    hits, _ = column.compute(column.fn, ctx)
    ref = pointing_game(want, items.pixel_masks, tolerance="standard")
    torch.testing.assert_close(hits.double(), ref, rtol=0, atol=0, equal_nan=True)
    # a map without a token grid (a baseline, a custom pixel map) is read as it is
    base = items.context("random", items.baselines()["random"](), {})
    assert torch.equal(base.point_pixels, base.pixels)
