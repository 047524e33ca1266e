"""Tests for the perturbation metrics of captum_ext.metrics: RISE deletion/insertion,
average drop / increase in confidence, token perturbation and ROAD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import captum_ext.metrics as M


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


class RegionSum(nn.Module):
    """logit_0 = sum of x over `region` (all channels), logit_1 = `other` (constant)."""

    def __init__(self, region: torch.Tensor, other: float = 0.0):
        super().__init__()
        self.register_buffer("region", region.float())
        self.other = other

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.region).sum(dim=(1, 2, 3))
        return torch.stack([s, torch.full_like(s, self.other)], dim=1)


# ----------------------------------------------------------------------------------------------
# RISE deletion / insertion
# ----------------------------------------------------------------------------------------------


def _region_setup():
    region = torch.zeros(4, 4)
    region[:2, :2] = 1.0  # 4 pixels
    model = RegionSum(region)
    x = torch.ones(1, 1, 4, 4)
    perfect = region.view(1, 4, 4) + 0.01 * torch.arange(16.0).view(1, 4, 4)
    inverted = -perfect
    return model, x, perfect, inverted


def test_deletion_perfect_vs_inverted_exact():
    model, x, perfect, inverted = _region_setup()
    # one pixel per step, score = logit = number of region pixels left.
    # perfect: 4,3,2,1,0,...,0 -> (1/16) * (3.5 + 2.5 + 1.5 + 0.5) = 0.5
    # inverted: 4 for 12 steps, then 3,2,1,0 -> (1/16) * (48 + 8) = 3.5
    d_perfect = M.deletion_auc(model, x, perfect, target=0, steps=16, score="logit")
    d_inv = M.deletion_auc(model, x, inverted, target=0, steps=16, score="logit")
    assert d_perfect.item() == pytest.approx(0.5, abs=1e-12)
    assert d_inv.item() == pytest.approx(3.5, abs=1e-12)
    assert d_perfect.item() < d_inv.item()
    # chunked evaluation gives the same numbers
    d_chunk = M.deletion_auc(model, x, perfect, target=0, steps=16, score="logit", batch_size=5)
    assert torch.equal(d_chunk, d_perfect)


def test_insertion_perfect_vs_inverted_exact():
    model, x, perfect, inverted = _region_setup()
    # zero substrate: perfect 0,1,2,3,4,4,... -> (1/16)(0.5+1.5+2.5+3.5+48) = 3.5; inverted 0.5
    kw = {"target": 0, "steps": 16, "score": "logit", "substrate": "zero"}
    assert M.insertion_auc(model, x, perfect, **kw).item() == pytest.approx(3.5, abs=1e-12)
    assert M.insertion_auc(model, x, inverted, **kw).item() == pytest.approx(0.5, abs=1e-12)
    # blur of a constant image is the same constant -> flat curve at 4 -> AUC 4
    kw["substrate"] = "blur"
    assert M.insertion_auc(model, x, perfect, **kw).item() == pytest.approx(4.0, abs=1e-5)


def test_deletion_curve_softmax_target_none_and_substrates():
    model, x, perfect, _ = _region_setup()
    auc, curve, xs = M.deletion_auc(model, x, perfect, steps=4, return_curve=True)
    # 4 pixels per step; softmax of [n_left, 0] for class 0 (predicted)
    expected = [sig(4), sig(0), sig(0), sig(0), sig(0)]
    assert curve[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert xs.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert auc.item() == pytest.approx(0.25 * ((sig(4) + sig(0)) / 2 + 3 * sig(0)), abs=1e-6)
    # "mean" substrate of a constant image: nothing changes -> flat
    flat = M.deletion_auc(model, x, perfect, steps=4, substrate="mean", score="logit")
    assert flat.item() == pytest.approx(4.0, abs=1e-6)
    # explicit tensor substrate of 0.5 halves every deleted region pixel
    half = M.deletion_auc(model, x, perfect, steps=4, substrate=torch.tensor(0.5), score="logit")
    assert half.item() == pytest.approx(0.25 * (3.0 + 3 * 2.0), abs=1e-6)
    with pytest.raises(ValueError, match="substrate"):
        M.deletion_auc(model, x, perfect, substrate="noise")
    with pytest.raises(ValueError, match=r"expected spatial size"):
        M.deletion_auc(model, x, torch.ones(1, 2, 2))


def test_gaussian_blur_properties():
    c = torch.full((2, 3, 9, 9), 0.7)
    assert torch.allclose(M.gaussian_blur(c), c, atol=1e-6)
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1.0
    y = M.gaussian_blur(x, 11, 5.0)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-6)  # mass preserved away from borders
    assert torch.allclose(y, y.transpose(2, 3)) and y[0, 0, 10, 10] == y.max()


def test_rise_attribution_object_path():
    from captum.attr import InputXGradient

    model, x, _, _ = _region_setup()
    x.requires_grad_()
    ixg = InputXGradient(model)
    a = M.deletion_auc(model, x, ixg, target=0, steps=16, score="logit")
    b = M.deletion_auc(model, x, ixg.attribute(x, target=0), target=0, steps=16, score="logit")
    assert torch.equal(a, b)
    # ixg = region indicator with ties in raster order: (0,0),(0,1),(1,0),(1,1) first -> perfect
    assert a.item() == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Average drop / increase in confidence
# ----------------------------------------------------------------------------------------------


def _ad_setup():
    model = RegionSum(torch.ones(2, 2), other=5.0)  # logit_0 = sum(x), logit_1 = 5
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)  # Y logit = 10
    amap = torch.tensor([[0.0, 0.2], [0.6, 1.0]]).view(1, 2, 2)  # already min-max normalised
    return model, x, amap


def test_average_drop_hand_cases():
    model, x, amap = _ad_setup()
    # keep=1: O = 0*1 + 0.2*2 + 0.6*3 + 1*4 = 6.2 -> AD = (10 - 6.2)/10 = 38 %
    ad = M.average_drop(model, x, amap, score="logit")
    assert ad.item() == pytest.approx(38.0, abs=1e-5)
    assert M.average_drop(model, x, amap, score="logit", percent=False).item() == pytest.approx(
        0.38, abs=1e-7
    )
    # keep=0.5: the 0.5-quantile of {0, .2, .6, 1} is 0.4 -> soft mask [[0,0],[.6,1]]
    # O = 1.8 + 4 = 5.8 -> 42 %; binary mask [[0,0],[1,1]] -> O = 7 -> 30 %
    assert M.average_drop(model, x, amap, keep=0.5, score="logit").item() == pytest.approx(
        42.0, abs=1e-5
    )
    ad_bin = M.average_drop(model, x, amap, keep=0.5, mask_mode="binary", score="logit")
    assert ad_bin.item() == pytest.approx(30.0, abs=1e-5)
    # softmax (default): Y = sig(10 - 5), O = sig(6.2 - 5)
    ad_sm = M.average_drop(model, x, amap).item()
    assert ad_sm == pytest.approx((sig(5) - sig(1.2)) / sig(5) * 100, abs=1e-4)
    # min-max normalisation: an affine rescaling of the map gives the same result
    assert M.average_drop(model, x, amap * 7 - 3, score="logit").item() == pytest.approx(
        38.0, abs=1e-4
    )
    assert M.increase_in_confidence(model, x, amap).item() == 0.0


def test_increase_in_confidence_hand_case():
    # logit_0 = x[1,1] - x[0,0]; input [[1,0],[0,2]] -> Y = 1; map zeroes (0,0) -> O = 2 > Y
    region = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    model = RegionSum(region, other=0.0)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2)
    amap = torch.tensor([[0.0, 0.5], [0.5, 1.0]]).view(1, 1, 2, 2)
    assert M.increase_in_confidence(model, x, amap, score="logit").item() == 1.0
    assert M.increase_in_confidence(model, x, amap, percent=True).item() == 100.0
    assert M.average_drop(model, x, amap).item() == 0.0
    # constant map -> min-max gives all zeros -> O = 0 < Y -> no increase
    const = torch.ones(1, 2, 2)
    assert M.increase_in_confidence(model, x, const, score="logit").item() == 0.0
    assert M.average_drop(model, x, const, score="logit").item() == pytest.approx(100.0)


def test_average_drop_ttame_preset_matches_single_calls():
    model, x, amap = _ad_setup()
    x2 = torch.cat([x, x.flip(-1)])
    a2 = torch.cat([amap, amap.flip(-1) * 0.5])
    out = M.average_drop_ttame(model, x2, a2)
    assert set(out) == {"AD100", "IC100", "AD50", "IC50", "AD15", "IC15"}
    for keep, tag in ((1.0, "100"), (0.5, "50"), (0.15, "15")):
        assert torch.allclose(out[f"AD{tag}"], M.average_drop(model, x2, a2, keep=keep))
        ic = M.increase_in_confidence(model, x2, a2, keep=keep, percent=True)
        assert torch.equal(out[f"IC{tag}"], ic)
    assert out["AD100"][0].item() == pytest.approx((sig(5) - sig(1.2)) / sig(5) * 100, abs=1e-4)
    # keep=0.15: 0.85-quantile of {0,.2,.6,1} = 0.6 + 0.55*0.4 = 0.82 -> only (1,1): O = 4
    assert out["AD15"][0].item() == pytest.approx((sig(5) - sig(-1)) / sig(5) * 100, abs=1e-4)
    with pytest.raises(ValueError, match="keep"):
        M.average_drop(model, x, amap, keep=0.0)


# ----------------------------------------------------------------------------------------------
# token perturbation (Chefer et al.)
# ----------------------------------------------------------------------------------------------


def _patch_setup():
    region = torch.zeros(4, 4)
    region[:2, :2] = 1.0  # patch 0 of the 2x2 grid of 2x2 patches
    model = RegionSum(region, other=2.0)  # logit_0 = 4 on ones, logit_1 = 2 -> predicted 0
    x = torch.ones(1, 1, 4, 4)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    return model, x, scores


def test_token_perturbation_top1_hand_case():
    model, x, scores = _patch_setup()
    fr = (0.25, 0.5, 0.75)
    auc, curve, xs = M.token_perturbation_auc(
        model, x, scores, mode="positive", fractions=fr, patch_size=2, return_curve=True
    )
    # positive: patch 0 removed first -> prediction flips at 25 %: [1, 0, 0, 0]
    assert curve[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert xs.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert auc.item() == pytest.approx(0.125, abs=1e-12)
    # negative: patches 3, 2, 1 removed, patch 0 kept -> [1, 1, 1, 1] -> 0.75
    neg = M.token_perturbation_auc(model, x, scores, mode="negative", fractions=fr, patch_size=2)
    assert neg.item() == pytest.approx(0.75, abs=1e-12)


def test_token_perturbation_softmax_and_pixel_maps():
    model, x, scores = _patch_setup()
    fr = (0.25, 0.5, 0.75)
    pos = M.token_perturbation_auc(
        model, x, scores, target=0, fractions=fr, patch_size=2, score="softmax"
    )
    expected = 0.25 * (sig(2) + sig(-2)) / 2 + 0.5 * sig(-2)
    assert pos.item() == pytest.approx(expected, abs=1e-6)
    # a pixel map is sum-pooled onto the patch grid: same ranking as `scores`
    pix = scores.view(1, 1, 2, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(
        M.token_perturbation_auc(model, x, pix, fractions=fr, patch_size=2),
        M.token_perturbation_auc(model, x, scores, fractions=fr, patch_size=2),
    )
    with pytest.raises(ValueError, match=r"expected shape \(1, 4\)"):
        M.token_perturbation_auc(model, x, torch.ones(1, 5), patch_size=2)
    with pytest.raises(ValueError, match="mode"):
        M.token_perturbation_auc(model, x, scores, mode="both", patch_size=2)


# ----------------------------------------------------------------------------------------------
# ROAD
# ----------------------------------------------------------------------------------------------


def test_imputation_single_pixel_hand_case():
    # centre of a 3x3 image: direct neighbours 1, diagonal neighbours 4
    # -> 4 * (1/6) * 1 + 4 * (1/12) * 4 = 2/3 + 4/3 = 2
    img = torch.tensor([[4.0, 1.0, 4.0], [1.0, 99.0, 1.0], [4.0, 1.0, 4.0]]).view(1, 3, 3)
    removed = torch.zeros(3, 3, dtype=torch.bool)
    removed[1, 1] = True
    out = M.noisy_linear_imputation(img.double(), removed, noise_std=0.0)
    assert out[0, 1, 1].item() == pytest.approx(2.0, abs=1e-12)
    out[0, 1, 1] = 99.0
    assert torch.equal(out, img.double())  # known pixels untouched


def test_imputation_linear_ramp_is_exact():
    h, w = 9, 10
    ar = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    yy, xx = torch.meshgrid(*ar, indexing="ij")
    img = torch.stack([0.5 * yy + 0.25 * xx + 1, -2.0 * yy + xx, 0.1 * xx - 3])
    removed = torch.zeros(h, w, dtype=torch.bool)
    removed[2:6, 3:7] = True  # interior block: solved jointly
    removed[7, 1] = True  # isolated interior pixel
    out = M.noisy_linear_imputation(img, removed, noise_std=0.0)
    assert torch.allclose(out, img, atol=1e-10, rtol=0)
    # the ramp is not reproduced if the removed block touches the border (weights renormalise)
    removed[0, 4] = True
    out_b = M.noisy_linear_imputation(img, removed, noise_std=0.0)
    assert not torch.allclose(out_b, img, atol=1e-6)


def test_imputation_constant_noise_and_errors():
    img = torch.full((2, 5, 5), 3.0)
    removed = torch.zeros(5, 5, dtype=torch.bool)
    removed[0, 0] = removed[2, 2] = removed[4, 3] = True  # corner, interior, border
    out = M.noisy_linear_imputation(img, removed, noise_std=0.0)
    assert torch.allclose(out, img, atol=1e-6) and out.dtype == img.dtype
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    n1 = M.noisy_linear_imputation(img, removed, 0.5, g1)
    n2 = M.noisy_linear_imputation(img, removed, 0.5, g2)
    assert torch.equal(n1, n2)
    assert torch.equal(n1[:, ~removed], img[:, ~removed])
    assert (n1[:, removed] - 3.0).abs().min() > 0
    assert torch.equal(M.noisy_linear_imputation(img, torch.zeros(5, 5, dtype=bool)), img)
    with pytest.raises(ValueError, match="every pixel"):
        M.noisy_linear_imputation(img, torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected shape \(5, 5\)"):
        M.noisy_linear_imputation(img, torch.ones(4, 5, dtype=torch.bool))


class BrightPixel(nn.Module):
    """logit_0 = 10 * x[..., 1, 1] (channel 0), logit_1 = 5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 10 * x[:, 0, 1, 1]
        return torch.stack([v, torch.full_like(v, 5.0)], dim=1)


def test_road_morf_lerf_hand_case():
    model = BrightPixel()
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0  # predicted class 0
    amap = torch.arange(16.0).view(1, 4, 4).flip(-1).flip(-2) * 0.01
    amap[0, 1, 1] = 1.0  # most relevant pixel
    pcts = (0.1, 0.5)  # floor(1.6) = 1 and 8 pixels
    # MoRF removes (1,1) first; imputed from zero neighbours -> 0 -> class 1 predicted
    morf = M.road(model, x, amap, order="morf", percentages=pcts, noise_std=0.0)
    assert morf.tolist() == [[0.0, 0.0]]
    # LeRF removes the least relevant pixels; (1,1) survives -> agreement 1
    lerf = M.road(model, x, amap, order="lerf", percentages=pcts, noise_std=0.0)
    assert lerf.tolist() == [[1.0, 1.0]]
    sm = M.road(model, x, amap, 0, "morf", pcts, score="softmax", noise_std=0.0)
    assert sm[0].tolist() == pytest.approx([sig(-5), sig(-5)], abs=1e-6)
    # a constant image is reproduced by the imputation whatever is removed
    xc = torch.full((2, 3, 4, 4), 0.2)
    const = M.road(
        RegionSum(torch.ones(4, 4), other=9.0),
        xc,
        torch.rand(2, 4, 4),
        score="logit",
        noise_std=0.0,
    )
    assert const.shape == (2, 9)
    assert torch.allclose(const, torch.full((2, 9), 0.2 * 48, dtype=torch.float64), atol=1e-4)
    with pytest.raises(ValueError, match="order"):
        M.road(model, x, amap, order="random")
    with pytest.raises(ValueError, match="score"):
        M.road(model, x, amap, score="top5")
