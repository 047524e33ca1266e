"""Tests for captum_ext.metrics: helpers, registry, localisation, complexity, discrimination,
similarity. Perturbation metrics live in test_metrics_perturbation.py, text and sanity
checks in test_metrics_text_sanity.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import captum_ext.metrics as M
from captum_ext.metrics._common import _logits, resolve_attributions, target_tensor

# 4x4 map with values 0..15 in raster order:
#  0  1  2  3
#  4  5  6  7
#  8  9 10 11
# 12 13 14 15
RAMP = torch.arange(16.0).view(1, 4, 4)


def mask_of(*pixels: tuple[int, int], size: int = 4) -> torch.Tensor:
    m = torch.zeros(1, size, size, dtype=torch.bool)
    for y, x in pixels:
        m[0, y, x] = True
    return m


# ----------------------------------------------------------------------------------------------
# helpers / registry
# ----------------------------------------------------------------------------------------------


def test_all_exports_exist_and_registry():
    for name in M.__all__:
        assert hasattr(M, name), name
    info = M.metric_info("deletion_auc")
    assert info.fn is M.deletion_auc and info.higher_is_better is False
    assert info.category == "faithfulness"
    assert M.pointing_game.metric_info.higher_is_better is True
    assert M.metric_info("discrimination_score").category == "discrimination"
    assert M.metric_info("token_auprc").category == "text"
    assert M.metric_info("model_randomisation").category == "sanity"
    assert M.metric_info("road").higher_is_better is None
    with pytest.raises(KeyError, match="known metrics"):
        M.metric_info("nope")


def test_logits_helper_handles_output_types():
    t = torch.randn(2, 3)

    class Out:
        logits = t

    assert _logits(t) is t
    assert _logits(Out()) is t
    assert _logits({"logits": t}) is t
    assert _logits((t, None)) is t
    with pytest.raises(TypeError, match="logits"):
        _logits("x")


class _Encoder(nn.Module):
    """A linear head on (B, 1, 4, 4) images, or on token ids (B, T) with a mask, that returns
    either plain logits or, like the encoders ConceptCDAM explains, an HF ModelOutput with
    only ``pooler_output``."""

    def __init__(self, pooled: bool):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(16, 3)
        self.token = nn.Embedding(6, 3)
        self.pooled = pooled

    def forward(self, x, attention_mask=None):
        if attention_mask is None:
            out = self.image(x.flatten(1))
        else:
            out = (self.token(x) * attention_mask[..., None]).sum(dim=1)
        if not self.pooled:
            return out
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=out)


_IMG = torch.linspace(-1, 1, 32).view(2, 1, 4, 4)
_MAP = torch.arange(32.0).view(2, 1, 4, 4).flip(-1)
_IDS = torch.tensor([[4, 1, 2, 3, 1, 5], [4, 3, 3, 2, 5, 0]])
_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
_TOK = torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.8, 0.0], [0.0, 0.2, 0.7, 0.4, 0.0, 0.0]])
LOGIT_READERS = {
    "deletion_auc": lambda m: M.deletion_auc(m, _IMG, _MAP, steps=4),
    "insertion_auc": lambda m: M.insertion_auc(m, _IMG, _MAP, steps=4, blur_kernel_size=3),
    "average_drop": lambda m: M.average_drop(m, _IMG, _MAP, keep=0.5),
    "increase_in_confidence": lambda m: M.increase_in_confidence(m, _IMG, _MAP, keep=0.5),
    "average_drop_ttame": lambda m: M.average_drop_ttame(m, _IMG, _MAP)["AD50"],
    "token_perturbation_auc": lambda m: M.token_perturbation_auc(
        m, _IMG, _MAP[:, 0, ::2, ::2].reshape(2, 4), patch_size=2, score="softmax"
    ),
    "road": lambda m: M.road(m, _IMG, _MAP, percentages=(0.25, 0.5), score="softmax"),
    "comprehensiveness": lambda m: M.comprehensiveness(m, _IDS, _TOK, attention_mask=_MASK),
    "sufficiency": lambda m: M.sufficiency(m, _IDS, _TOK, attention_mask=_MASK),
}


@pytest.mark.parametrize("name", list(LOGIT_READERS))
def test_metrics_accept_pooler_output_only_model_outputs(name):
    # Regression: metrics read scores through captum_ext._scores.model_output_to_tensor, so an
    # encoder output without `logits` (ConceptCDAM's setting) gives the same numbers.
    plain = LOGIT_READERS[name](_Encoder(pooled=False))
    pooled = LOGIT_READERS[name](_Encoder(pooled=True))
    assert torch.isfinite(plain).all()
    assert torch.equal(pooled, plain)


def test_target_tensor():
    assert target_tensor(2, 3, "cpu").tolist() == [2, 2, 2]
    assert target_tensor([0, 1, 2], 3, "cpu").tolist() == [0, 1, 2]
    assert target_tensor(torch.tensor([[1], [0]]), 2, "cpu").tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        target_tensor([0, 1], 3, "cpu")


def test_nan_maps_raise():
    m = mask_of((0, 0))
    with pytest.raises(ValueError, match="only NaN"):
        M.pointing_game(torch.full((1, 4, 4), float("nan")), m)
    one_nan = RAMP.clone()
    one_nan[0, 1, 1] = float("nan")
    for fn in (M.pointing_game, M.relevance_mass_accuracy, M.relevance_rank_accuracy):
        with pytest.raises(ValueError, match="1 NaN"):
            fn(one_nan, m)
    with pytest.raises(ValueError, match="NaN"):
        M.sparsity(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="infinite"):
        M.pearson(torch.tensor([[1.0, float("inf")]]), torch.tensor([[1.0, 2.0]]))


def test_shape_errors_name_expected_and_got():
    with pytest.raises(ValueError, match=r"expected shape \(1, 4, 4\), got \(1, 3, 3\)"):
        M.pointing_game(RAMP, torch.zeros(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(16,\)"):
        M.pointing_game(torch.arange(16.0), mask_of((0, 0)))
    with pytest.raises(ValueError, match="0/1"):
        M.pointing_game(RAMP, torch.full((1, 4, 4), 2))


def test_channel_maps_are_summed():
    # channel 0 peaks at (0, 0) with 10, channel 1 adds 4 everywhere but 9 at (3, 3)
    a = torch.zeros(1, 2, 4, 4)
    a[0, 0, 0, 0] = 10.0
    a[0, 1] = 4.0
    a[0, 1, 3, 3] = 9.0  # sum at (3,3) = 9 < 14 at (0,0)
    assert M.pointing_game(a, mask_of((0, 0))).item() == 1.0
    assert M.pointing_game(a[:, 1:], mask_of((3, 3))).item() == 1.0  # (B, 1, H, W)


# ----------------------------------------------------------------------------------------------
# pointing game
# ----------------------------------------------------------------------------------------------


def test_pointing_game_hand_cases():
    # argmax of RAMP is (3, 3)
    assert M.pointing_game(RAMP, mask_of((3, 3))).item() == 1.0
    assert M.pointing_game(RAMP, mask_of((0, 0), (0, 1), (1, 0), (1, 1))).item() == 0.0
    # mask only at (1, 1): Euclidean distance to (3, 3) is sqrt(8) = 2.83
    assert M.pointing_game(RAMP, mask_of((1, 1)), tolerance=2).item() == 0.0
    assert M.pointing_game(RAMP, mask_of((1, 1)), tolerance=3).item() == 1.0
    # mask at (3, 1): distance 2 -> hit with tolerance 2, miss with 1
    assert M.pointing_game(RAMP, mask_of((3, 1)), tolerance=2).item() == 1.0
    assert M.pointing_game(RAMP, mask_of((3, 1)), tolerance=1).item() == 0.0


def test_pointing_game_ties_and_constant_map():
    a = torch.zeros(1, 4, 4)
    a[0, 0, 0] = a[0, 3, 3] = 1.0  # two tied maxima, one inside -> 1/2
    assert M.pointing_game(a, mask_of((0, 0))).item() == 0.5
    const = torch.ones(1, 4, 4)
    # all 16 pixels tied; mask covers 4 -> 4/16
    assert M.pointing_game(const, mask_of((0, 0), (0, 1), (2, 2), (3, 3))).item() == 0.25
    # tolerance 1 dilates (1, 1) into a plus of 5 pixels -> 5/16
    assert M.pointing_game(const, mask_of((1, 1)), tolerance=1).item() == 5 / 16


def test_pointing_game_empty_mask_is_nan_and_batch():
    a = torch.stack([RAMP[0], RAMP[0]])
    m = torch.cat([mask_of((3, 3)), torch.zeros(1, 4, 4, dtype=torch.bool)])
    out = M.pointing_game(a, m)
    assert out.dtype == torch.float64 and out.shape == (2,)
    assert out[0].item() == 1.0 and math.isnan(out[1].item())


def test_standard_tolerance_is_15_px_at_224_scaled_by_the_shorter_side():
    # 15 * s / 224, rounded half up: 7.5 -> 8, 2.14 -> 2, 0.47 -> 0, 0.54 -> 1
    cases = {224: 15, 448: 30, 112: 8, 32: 2, 64: 4, 7: 0, 8: 1, (32, 48): 2, (300, 224): 15}
    for size, px in cases.items():
        assert M.standard_tolerance(size) == px, size
    assert (M.STANDARD_TOLERANCE_PX, M.STANDARD_TOLERANCE_SIZE) == (15, 224)
    for bad, err in ((0, ValueError), (32.0, TypeError), ((32,), ValueError), (True, TypeError)):
        with pytest.raises(err):
            M.standard_tolerance(bad)
    with pytest.raises(ValueError, match="'standard'"):
        M.pointing_game(RAMP, mask_of((1, 1)), tolerance="15px")


def _peak_at(size: int, y: int, x: int) -> torch.Tensor:
    a = torch.zeros(1, size, size, dtype=torch.float64)
    a[0, y, x] = 1.0
    return a


@pytest.mark.parametrize(
    ("size", "inside", "outside"),
    [
        # 224 px, tolerance 15: straight (15 / 16 px) and diagonal (9, 12) -> 15 / (11, 11) -> 15.6
        (224, [(100, 115), (85, 100), (109, 112), (100, 100)], [(100, 116), (84, 100), (111, 111)]),
        # 32 px, tolerance 2: (2, 0) and (1, 1) -> 1.41 hit; (3, 0) and (2, 1) -> 2.24 miss
        (32, [(10, 12), (8, 10), (9, 11), (10, 10)], [(10, 13), (7, 10), (8, 11)]),
    ],
)
def test_standard_pointing_game_literal_reference(size, inside, outside):
    # One-pixel object at (100, 100) / (10, 10) and a single-pixel peak: a hit is a peak
    # within Euclidean distance standard_tolerance(size) of the object (Zhang et al. 2016).
    c = 100 if size == 224 else 10
    tol = 15 if size == 224 else 2
    m = mask_of((c, c), size=size)
    for (y, x), want in [*((p, 1.0) for p in inside), *((p, 0.0) for p in outside)]:
        d2 = (y - c) ** 2 + (x - c) ** 2
        assert (d2 <= tol**2) == (want == 1.0), (y, x)  # the case is what it claims
        got = M.pointing_game(_peak_at(size, y, x), m, tolerance="standard")
        assert got.dtype == torch.float64 and got.item() == want, (size, y, x)
        assert M.pointing_game(_peak_at(size, y, x), m, tolerance=tol).item() == want
    # A block-shaped object: the distance counts from its nearest pixel, not its centre.
    block = torch.zeros(1, size, size, dtype=torch.bool)
    block[0, c : c + 4, c : c + 6] = True
    assert M.pointing_game(_peak_at(size, c + 3, c + 5 + tol), block, "standard").item() == 1.0
    assert M.pointing_game(_peak_at(size, c + 3, c + 6 + tol), block, "standard").item() == 0.0


def test_standard_pointing_game_uses_the_map_size_and_shares_ties():
    # 32 x 48 map: the shorter side (32) sets the tolerance (2 px), not the longer (3 px).
    m = torch.zeros(1, 32, 48, dtype=torch.bool)
    m[0, 10, 20] = True
    a = torch.zeros(1, 32, 48, dtype=torch.float64)
    a[0, 10, 23] = 1.0
    assert M.pointing_game(a, m, tolerance="standard").item() == 0.0
    a[0, 10, 22] = 1.0  # two tied maxima, one within 2 px: half a hit
    assert M.pointing_game(a, m, tolerance="standard").item() == 0.5
    assert math.isnan(M.pointing_game(a, torch.zeros_like(m), tolerance="standard").item())


def test_peak_offset_literal():
    # Object: rows 10..13, columns 4..9 -> centroid (x, y) = (6.5, 11.5).
    m = torch.zeros(3, 32, 32, dtype=torch.bool)
    m[:, 10:14, 4:10] = True
    m[2] = False  # empty mask -> NaN
    a = torch.zeros(3, 32, 32, dtype=torch.float64)
    a[0, 8, 9] = 2.0  # peak (x, y) = (9, 8)
    a[1, 12, 3] = a[1, 14, 7] = 1.0  # two tied maxima: mean position (5, 13)
    out = M.peak_offset(a, m)
    assert out.dtype == torch.float64 and out.shape == (3, 2)
    assert out[0].tolist() == [2.5, -3.5]
    assert out[1].tolist() == [-1.5, 1.5]
    assert torch.isnan(out[2]).all()
    # A map equal to a symmetric mask peaks (on average) at its centre.
    assert M.peak_offset(m[:1].double(), m[:1]).tolist() == [[0.0, 0.0]]
    assert M.peak_offset(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4, dtype=bool)).shape == (0, 2)


def test_pointing_game_random_maps_score_chance():
    g = torch.Generator().manual_seed(0)
    n = 2000
    maps = torch.rand(n, 4, 4, generator=g)
    idx = torch.rand(n, 16, generator=g).argsort(dim=1)[:, :4]  # 4 of 16 pixels = 1/4
    masks = torch.zeros(n, 16, dtype=torch.bool).scatter_(1, idx, True).view(n, 4, 4)
    rate = M.pointing_game(maps, masks).mean().item()
    assert abs(rate - 0.25) < 0.05


def test_mask_as_map_is_perfect():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(5, 6, 6, generator=g) < 0.3
    masks[:, 0, 0] = True
    a = masks.float()
    for fn in (M.pointing_game, M.relevance_mass_accuracy, M.relevance_rank_accuracy):
        assert torch.equal(fn(a, masks), torch.ones(5, dtype=torch.float64)), fn.__name__


# ----------------------------------------------------------------------------------------------
# relevance mass / rank accuracy
# ----------------------------------------------------------------------------------------------


def test_relevance_mass_accuracy_hand_case():
    a = RAMP - 4  # values -4..11
    m = mask_of((3, 0), (3, 1), (3, 2), (3, 3))  # bottom row: 8+9+10+11 = 38
    # positive mass: 1+2+...+11 = 66
    assert M.relevance_mass_accuracy(a, m).item() == pytest.approx(38 / 66, abs=1e-15)
    # signed: total = -4-3-2-1+0+1+...+11 = 56
    val = M.relevance_mass_accuracy(a, m, positive_only=False).item()
    assert val == pytest.approx(38 / 56, abs=1e-15)


def test_relevance_mass_accuracy_nan_cases():
    m = mask_of((0, 0))
    assert math.isnan(M.relevance_mass_accuracy(-torch.ones(1, 4, 4), m).item())
    assert math.isnan(M.relevance_mass_accuracy(RAMP, torch.zeros(1, 4, 4, dtype=bool)).item())


def test_relevance_rank_accuracy_hand_case_and_ties():
    # mask {0, 14, 15}: K = 3, top-3 of RAMP are 15, 14, 13 -> 2 of 3 inside
    m = mask_of((0, 0), (3, 2), (3, 3))
    assert M.relevance_rank_accuracy(RAMP, m).item() == pytest.approx(2 / 3, abs=1e-15)
    # constant map: stable order picks the first K=2 pixels in raster order: (0,0), (0,1)
    const = torch.ones(1, 4, 4)
    assert M.relevance_rank_accuracy(const, mask_of((0, 0), (1, 1))).item() == 0.5
    assert M.relevance_rank_accuracy(const, mask_of((0, 0), (0, 1))).item() == 1.0
    assert math.isnan(M.relevance_rank_accuracy(RAMP, torch.zeros(1, 4, 4, dtype=bool)).item())


# ----------------------------------------------------------------------------------------------
# sparsity
# ----------------------------------------------------------------------------------------------


def test_sparsity_tokens_and_images():
    # threshold 0.05 * max|s| = 0.05: {0.01, 0.04} below -> 2/4
    tok = torch.tensor([[0.01, 0.04, 0.06, 1.0], [-1.0, 0.0, 0.3, 0.02]])
    assert M.sparsity(tok).tolist() == [0.5, 0.5]
    assert M.sparsity(tok, threshold=0.5).tolist() == [0.75, 0.75]
    img = tok.view(2, 1, 2, 2)
    assert M.sparsity(img).tolist() == [0.5, 0.5]
    assert M.sparsity(img[:, 0]).tolist() == [0.5, 0.5]
    assert math.isnan(M.sparsity(torch.zeros(1, 5)).item())


# ----------------------------------------------------------------------------------------------
# discrimination
# ----------------------------------------------------------------------------------------------


def test_discrimination_hand_case():
    ma = mask_of((0, 0), (1, 0), (2, 0), (3, 0))  # left column
    mb = mask_of((0, 3), (1, 3), (2, 3), (3, 3))  # right column
    ra = torch.zeros(1, 4, 4)
    ra[0, 0, 0], ra[0, 1, 0], ra[0, 0, 3] = 2.0, 1.0, 1.0  # 3 on own, 1 on other -> D_a = 3/4
    ra[0, 1, 1] = 5.0  # background: ignored
    ra[0, 2, 3] = -7.0  # negative: ignored
    rb = torch.zeros(1, 4, 4)
    rb[0, 0, 3], rb[0, 2, 0] = 2.0, 2.0  # 2 on own, 2 on other -> D_b = 1/2
    assert M.discrimination_score(ra, rb, ma, mb).item() == pytest.approx(0.625, abs=1e-15)
    # swapped roles: 1 - D
    assert M.discrimination_score(ra, rb, mb, ma).item() == pytest.approx(0.375, abs=1e-15)


def test_discrimination_class_agnostic_is_exactly_half():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(500, 7, 7, generator=g) * torch.rand(500, 1, 1, generator=g) * 1e3
    ma = torch.rand(500, 7, 7, generator=g) < 0.3
    mb = torch.rand(500, 7, 7, generator=g) < 0.3
    d = M.discrimination_score(r, r.clone(), ma, mb)
    assert torch.equal(d, torch.full((500,), 0.5, dtype=torch.float64))


def test_discrimination_perfect_inverse_and_degenerate():
    ma = mask_of((0, 0), (0, 1))
    mb = mask_of((3, 3), (2, 3), (0, 1))  # (0, 1) is shared -> excluded from both regions
    assert M.discrimination_score(ma.float(), mb.float(), ma, mb).item() == 1.0
    assert M.discrimination_score(mb.float(), ma.float(), ma, mb).item() == 0.0
    z = torch.zeros(1, 4, 4)
    assert M.discrimination_score(z, z, ma, mb).item() == 0.5
    # only the shared pixel is relevant: nothing discriminates -> 0.5
    shared = mask_of((0, 1)).float()
    assert M.discrimination_score(shared, shared * 3, ma, mb).item() == 0.5


# ----------------------------------------------------------------------------------------------
# pearson / spearman
# ----------------------------------------------------------------------------------------------


def test_pearson_spearman_hand_cases():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[2.0, 4.0, 6.0, 8.0], [4.0, 3.0, 2.0, 1.0]])
    assert M.pearson(a, b).tolist() == pytest.approx([1.0, -1.0], abs=1e-15)
    # monotone but non-linear: spearman 1, pearson < 1
    c = a**3
    assert M.spearman(a, c).tolist() == pytest.approx([1.0, 1.0], abs=1e-15)
    assert M.pearson(a, c)[0].item() < 0.99
    assert math.isnan(M.pearson(a, torch.ones(2, 4))[0].item())
    assert math.isnan(M.spearman(torch.ones(2, 4), a)[1].item())


def test_pearson_spearman_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 30), generator=g).double()  # many ties
    b = torch.randn(3, 30, generator=g).double()
    for i in range(3):
        assert M.spearman(a, b)[i].item() == pytest.approx(
            stats.spearmanr(a[i], b[i]).statistic, abs=1e-12
        )
        assert M.pearson(a, b)[i].item() == pytest.approx(
            stats.pearsonr(a[i], b[i]).statistic, abs=1e-12
        )
    assert torch.equal(
        M.similarity.rankdata(a), torch.from_numpy(stats.rankdata(a.numpy(), axis=1))
    )
    with pytest.raises(ValueError, match="expected"):
        M.pearson(torch.zeros(2, 4), torch.zeros(2, 5))


# ----------------------------------------------------------------------------------------------
# Attribution-object path
# ----------------------------------------------------------------------------------------------


def _linear_model(weight_map: torch.Tensor) -> nn.Module:
    """Two-class linear model on (B, 1, 4, 4): logit_0 = <w, x>, logit_1 = -<w, x>."""
    lin = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([weight_map.flatten(), -weight_map.flatten()]))
    return nn.Sequential(nn.Flatten(), lin)


def test_attribution_object_path():
    from captum.attr import InputXGradient, Saliency

    w = torch.zeros(4, 4)
    w[2, 1] = 3.0  # largest positive weight
    w[0, 3] = -5.0  # largest |weight|, negative
    model = _linear_model(w)
    x = torch.ones(1, 1, 4, 4, requires_grad=True)
    sal = Saliency(model)
    # Saliency = |grad| = |w|: max at (0, 3)
    assert M.pointing_game(sal, mask_of((0, 3)), inputs=x, target=0).item() == 1.0
    # signed gradient for class 0 = w: max at (2, 1)
    kw = {"abs": False}
    assert M.pointing_game(sal, mask_of((2, 1)), inputs=x, target=0, attribute_kwargs=kw) == 1.0
    # and for class 1 (= -w) the max is at (0, 3)
    assert M.pointing_game(sal, mask_of((0, 3)), inputs=x, target=1, attribute_kwargs=kw) == 1.0
    # same numbers as with the precomputed tensor
    ixg = InputXGradient(model)
    pre = ixg.attribute(x, target=0)
    m = mask_of((2, 1), (0, 3))
    assert torch.equal(
        M.relevance_mass_accuracy(ixg, m, inputs=x, target=0),
        M.relevance_mass_accuracy(pre, m),
    )
    assert M.relevance_mass_accuracy(ixg, m, inputs=x, target=0).item() == 1.0
    # discrimination with Attribution objects for both classes: class 0 map = w*x, class 1 = -w*x
    d = M.discrimination_score(
        ixg, ixg, mask_of((2, 1)), mask_of((0, 3)), inputs=x, target_a=0, target_b=1
    )
    assert d.item() == 1.0
    assert M.sparsity(ixg, inputs=x, target=0).item() == 14 / 16
    with pytest.raises(ValueError, match="inputs"):
        M.pointing_game(sal, mask_of((0, 3)))
    with pytest.raises(TypeError, match="attribute"):
        resolve_attributions([1, 2], x)
