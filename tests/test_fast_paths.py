"""The per-call fast paths give what the slow paths they replace gave."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE_MODELS, build, make_inputs

from captum_ext import AttentionMap, adapter_for
from captum_ext.attr.base import upsample_nearest
from captum_ext.capture import _all_modules


@pytest.mark.parametrize("factors", [(1, 1), (8, 8), (14, 16), (16, 14), (41, 8), (8, 47)])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (7, 5), (14, 14)])
def test_cell_expansion_equals_nearest_interpolation(grid, factors):
    g = torch.randn(2, 3, *grid, dtype=torch.float64)
    size = (grid[0] * factors[0], grid[1] * factors[1])
    got = upsample_nearest(g, *factors)
    assert got.shape == (2, 3, *size)
    assert torch.equal(got, F.interpolate(g, size=size, mode="nearest"))


def test_input_check_finds_nan_and_inf_but_not_an_overflowing_sum():
    case = IMAGE_MODELS[0]
    adapter = adapter_for(build(case))
    x, _ = make_inputs(case, batch=2, dtype=torch.float32)
    adapter.check_inputs(x, "m")
    huge = torch.full_like(x, 3e38)  # finite entries whose float32 sum overflows to inf
    adapter.check_inputs(huge, "m")
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            adapter.check_inputs(y, "m")
    mixed = x.clone()
    mixed[0, 0, 0, 0], mixed[0, 0, 0, 1] = float("inf"), -float("inf")  # sum is NaN
    with pytest.raises(ValueError, match="NaN or inf"):
        adapter.check_inputs(mixed, "m")


@pytest.mark.parametrize("case", IMAGE_MODELS[:2] + IMAGE_MODELS[-1:], ids=lambda c: c.name)
def test_module_walk_equals_modules(case):
    model = build(case)
    model.shared = model.blocks[0] if hasattr(model, "blocks") else torch.nn.Identity()
    assert {id(m) for m in _all_modules(model)} == {id(m) for m in model.modules()}
    assert len(_all_modules(model)) == len(list(model.modules()))


def test_mixed_training_flags_come_back():
    case = IMAGE_MODELS[0]
    model = build(case)
    model.blocks[0].train()
    before = [m.training for m in model.modules()]
    x, _ = make_inputs(case)
    AttentionMap(model).attribute(x)
    assert [m.training for m in model.modules()] == before


def test_mhex_token_maps_are_placed_as_every_other_method_places_them():
    # patch 41: nearest interpolation does not repeat each cell 41 times, so a plain cell
    # expansion would shift maps by a pixel; MHEX formats through format_token_map's fallback
    import timm
    from captum.attr import LayerAttribution

    from captum_ext import MHEX

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=82, patch_size=41, depth=1, embed_dim=16, num_heads=2, num_classes=3
    ).eval()
    mhex = MHEX(model).mark_fitted()
    x = torch.rand(2, 3, 82, 82)
    grid = mhex.attribute(x, target=1, output="grid")
    expected = LayerAttribution.interpolate(grid, (82, 82), interpolate_mode="nearest")
    cells = grid[..., :, None, :, None].expand(2, 1, 2, 41, 2, 41).reshape(2, 1, 82, 82)
    assert not torch.equal(expected, cells)
    assert torch.equal(mhex.attribute(x, target=1), expected)
