"""The DINO pieces of the fine-resolution zoo's training script, against literal references.

``benchmarks/training/train_dino.py`` implements the DINO loss (Caron et al. 2021, eq. 2-3)
itself; here it is compared in float64 with a per-sample, per-class loop over the paper's
formula, and the augmentations and the any-size forward are checked on tiny inputs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    sys.path.insert(0, str(ROOT / "benchmarks" / "training"))
    try:
        import train_dino
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "training"))
    return train_dino


def _literal_dino_loss(student, teacher, center, tau_s, tau_t) -> float:
    """H(P_t, P_s) averaged over pairs of different views and samples, by explicit loops."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            pair = 0.0
            for b in range(t.shape[0]):
                zt = [
                    math.exp((t[b, k].item() - center[k].item()) / tau_t) for k in range(t.shape[1])
                ]
                zs = [math.exp(s[b, k].item() / tau_s) for k in range(s.shape[1])]
                pt = [v / sum(zt) for v in zt]
                ps = [v / sum(zs) for v in zs]
                pair += -sum(pt[k] * math.log(ps[k]) for k in range(len(pt)))
            total += pair / t.shape[0]
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_student", [2, 5])
def test_dino_loss_matches_the_papers_formula_in_float64(n_student):
    td = _script()
    g = torch.Generator().manual_seed(n_student)
    student = [torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(n_student)]
    teacher = [torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(7, generator=g, dtype=torch.float64) * 0.3
    got = td.dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    want = _literal_dino_loss(student, teacher, center, 0.1, 0.04)
    assert got.dtype == torch.float64
    assert abs(got.item() - want) < 1e-10 * max(1.0, abs(want))


def test_dino_loss_sends_no_gradient_to_the_teacher_and_refuses_one_view():
    td = _script()
    s = [torch.randn(2, 4, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 4, requires_grad=True) for _ in range(2)]
    td.dino_loss(s, t, torch.zeros(4), 0.1, 0.04).backward()
    assert all(v.grad is None for v in t)
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in s)
    with pytest.raises(ValueError, match="at least 2 student views"):
        td.dino_loss(s[:1], t[:1], torch.zeros(4), 0.1, 0.04)


def test_random_resized_crop_of_full_scale_is_identity_or_mirror():
    td = _script()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    out = td.random_resized_crop(x, 16, (1.0, 1.0), g, ratio=(1.0, 1.0))
    for a, b in zip(out, x, strict=True):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)
    small = td.random_resized_crop(x, 8, (0.1, 0.4), g)
    assert small.shape == (6, 3, 8, 8)
    assert small.min() >= x.min() - 1e-6 and small.max() <= x.max() + 1e-6


def test_colour_augmentation_keeps_images_in_range():
    td = _script()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = td.augment_colour(x, torch.Generator().manual_seed(2), solarize=1.0)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_forward_tokens_equals_the_models_own_forward_at_its_size():
    import timm

    td = _script()
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        own = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(td.forward_tokens(model, x), own)
        assert td.forward_tokens(model, torch.rand(2, 3, 16, 16)).shape == (2, 16)


def test_a_few_dino_steps_run_and_keep_the_teacher_as_backbone():
    import timm

    from captum_ext.data import ShapesDataset

    td = _script()
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ShapesDataset(32, 3, layout="free", size=32)
    cfg = td.DINOConfig(batch_size=8, out_dim=16, hidden_dim=16, bottleneck_dim=8, local_size=16)
    losses = td.train_dino(
        model, data, cfg, torch.Generator().manual_seed(0), steps=3, progress=False
    )
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    after = model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved  # the EMA teacher moved towards the student
