"""Tests for the ERASER text metrics and the model-randomisation sanity check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import captum_ext.metrics as M


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ----------------------------------------------------------------------------------------------
# ERASER comprehensiveness / sufficiency
# ----------------------------------------------------------------------------------------------

# vocabulary: 0 [PAD], 1 "good" (+2), 2 "bad" (-1), 3 "ok" (+0.5), 4 [CLS], 5 [SEP]
WEIGHTS = torch.tensor([0.0, 2.0, -1.0, 0.5, 0.0, 0.0])


class BagOfWords(nn.Module):
    """logit_1 = sum of WEIGHTS over attended tokens, logit_0 = 0."""

    def __init__(self, output_object: bool = False):
        super().__init__()
        self.output_object = output_object

    def forward(self, input_ids, attention_mask):
        l1 = (WEIGHTS[input_ids] * attention_mask).sum(dim=1)
        logits = torch.stack([torch.zeros_like(l1), l1], dim=1)
        if self.output_object:
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=logits)
        return logits


def _text_setup():
    # [CLS] good bad ok good [SEP]; logit_1 = 2 - 1 + 0.5 + 2 = 3.5 -> class 1 predicted
    ids = torch.tensor([[4, 1, 2, 3, 1, 5]])
    special = torch.tensor([[True, False, False, False, False, True]])
    # [CLS] gets the highest score but is special: never removed / counted
    scores = torch.tensor([[9.0, 0.9, 0.1, 0.5, 0.8, 7.0]])
    return ids, special, scores


def test_comprehensiveness_hand_case():
    ids, special, scores = _text_setup()
    kw = {"special_mask": special, "fractions": (0.25, 0.5), "per_fraction": True}
    # n = 4 valid tokens; 25 % -> remove "good"(0.9): logit 1.5; 50 % -> also "good"(0.8): -0.5
    out = M.comprehensiveness(BagOfWords(), ids, scores, target=1, score="logit", **kw)
    assert out.shape == (1, 2)
    assert out[0].tolist() == pytest.approx([2.0, 4.0], abs=1e-6)
    sm = M.comprehensiveness(
        BagOfWords(True), ids, scores, special_mask=special, fractions=(0.25, 0.5)
    )
    expected = ((sig(3.5) - sig(1.5)) + (sig(3.5) - sig(-0.5))) / 2
    assert sm.item() == pytest.approx(expected, abs=1e-6)
    # default ERASER bins on n = 4: k = 1, 1, 1, 1, 2 -> (2 + 2 + 2 + 2 + 4) / 5 = 2.4
    d = M.comprehensiveness(BagOfWords(), ids, scores, 1, special_mask=special, score="logit")
    assert d.item() == pytest.approx(2.4, abs=1e-6)


def test_sufficiency_hand_case():
    ids, special, scores = _text_setup()
    # keep only "good"(0.9): logit 2 -> 3.5 - 2 = 1.5; keep both "good": 4 -> -0.5; mean 0.5
    out = M.sufficiency(
        BagOfWords(), ids, scores, 1, special_mask=special, fractions=(0.25, 0.5), score="logit"
    )
    assert out.item() == pytest.approx(0.5, abs=1e-6)


def test_text_special_and_padding_not_counted():
    ids, special, scores = _text_setup()
    # a second example padded at the end: [CLS] bad good [SEP] [PAD] [PAD]
    ids2 = torch.cat([ids, torch.tensor([[4, 2, 1, 5, 0, 0]])])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    special2 = torch.cat([special, torch.tensor([[True, False, False, True, False, False]])])
    # padding gets huge scores but must be ignored; n = 2 for example 2
    scores2 = torch.cat([scores, torch.tensor([[0.0, 0.2, 0.1, 0.0, 50.0, 60.0]])])
    out = M.comprehensiveness(
        BagOfWords(),
        ids2,
        scores2,
        target=1,
        attention_mask=mask,
        special_mask=special2,
        fractions=(0.5,),
        score="logit",
    )
    # example 2: logit 1; remove top 1 of 2 valid tokens = "bad" -> logit 2 -> 1 - 2 = -1
    assert out.tolist() == pytest.approx([4.0, -1.0], abs=1e-6)
    # without special_mask the [CLS] (score 9) would be removed first instead of "good"
    no_special = M.comprehensiveness(
        BagOfWords(), ids, scores, 1, fractions=(1 / 6,), score="logit"
    )
    assert no_special.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"expected shape \(1, 6\)"):
        M.comprehensiveness(BagOfWords(), ids, torch.ones(1, 5))
    with pytest.raises(ValueError, match="NaN"):
        M.sufficiency(BagOfWords(), ids, torch.full((1, 6), float("nan")))


def test_text_attribution_object_path():
    from captum.attr import Saliency

    class Embedded(nn.Module):
        # takes one-hot float "ids" (B, T, V) so Saliency can differentiate through it
        def forward(self, onehot):
            l1 = (onehot @ WEIGHTS).sum(dim=1)
            return torch.stack([torch.zeros_like(l1), l1], dim=1)

    ids, _, _ = _text_setup()
    onehot = nn.functional.one_hot(ids, 6).float().requires_grad_()
    sal = Saliency(Embedded())
    # (B, T, V) gradients summed over V: |w| of every vocabulary entry -> same for all tokens
    s = M.token_auprc(sal, torch.tensor([[0, 1, 0, 0, 1, 0]]), inputs=onehot, target=1)
    # all tokens tie (|w| sum = 3.5) -> one threshold: precision 2/6, recall 1 -> AP = 1/3
    assert s.item() == pytest.approx(1 / 3, abs=1e-12)


def test_token_auprc_hand_cases():
    # scores .9 .8 .7 .6, rationale 1 0 1 0: AP = .5 * 1 + .5 * 2/3 = 5/6
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]])
    r = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert M.token_auprc(s, r).tolist() == pytest.approx([5 / 6, 1.0], abs=1e-15)
    # ties: [.5, .5, .1] vs [1, 0, 1]: thresholds .5 (P 1/2, R 1/2), .1 (P 2/3, R 1) -> 7/12
    t = M.token_auprc(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([[True, False, True]]))
    assert t.item() == pytest.approx(7 / 12, abs=1e-15)
    # valid mask drops position 1 -> perfect ranking of the rest
    v = torch.tensor([[True, False, True, True], [True, True, True, True]])
    assert M.token_auprc(s, r, valid_mask=v)[0].item() == 1.0
    assert math.isnan(M.token_auprc(s[:1], torch.zeros(1, 4, dtype=torch.bool)).item())


# ----------------------------------------------------------------------------------------------
# model randomisation
# ----------------------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _grad_x_input(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    from captum.attr import InputXGradient

    return InputXGradient(model).attribute(x.clone().requires_grad_(), target=target)


def test_model_randomisation_cascading_drops_and_model_untouched():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    rng_state = torch.get_rng_state()
    res = M.model_randomisation(model, _grad_x_input, x, target=0)
    assert [name for name, _ in res] == ["4", "2", "0"]  # output side first
    sims = [s for _, s in res]
    assert all(s < 0.9 for s in sims), sims
    assert set(model.state_dict()) == set(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    # deterministic given the seed
    assert M.model_randomisation(model, _grad_x_input, x, target=0) == res


def test_model_randomisation_detects_model_independent_explanations():
    model = _mlp()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))

    def edge_detector(m, inputs, target):  # ignores the model
        return inputs * 2

    res = M.model_randomisation(model, edge_detector, x, target=0, cascading=False)
    assert res == [("4", 1.0), ("2", 1.0), ("0", 1.0)]
    res_abs = M.model_randomisation(
        model, _grad_x_input, x, target=1, cascading=False, absolute=True, similarity="pearson"
    )
    assert [n for n, _ in res_abs] == ["4", "2", "0"] and res_abs[0][1] < 0.99


def test_model_randomisation_normal_init_for_custom_parameters():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.w

    model = nn.Sequential(Scale(), nn.Linear(8, 2))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    res = M.model_randomisation(model, _grad_x_input, x, target=0, init_std=1.0)
    assert [n for n, _ in res] == ["1", "0"]
    assert torch.equal(model[0].w, torch.ones(8))
