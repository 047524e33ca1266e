"""The DINO pieces of the fine-resolution zoo's training script, against literal references.

``benchmarks/training/train_dino.py`` implements the DINO loss (Caron et al. 2021, eq. 2-3)
itself; here it is compared in float64 with a per-sample, per-class loop over the paper's
formula, and the augmentations and the any-size forward are checked on tiny inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bench_scripts import training_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return training_script("train_dino")


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


def _convstem(td, size=32):
    from captum_ext.zoo._build import build_model

    kw = dict(td._VIT, img_size=size, embed_dim=16, depth=1, stem_chs=[8, 8, 16, 16])
    return build_model({"arch": "zoo_vit_convstem", "library": "timm", "model_kwargs": kw})


def test_whiten_conv_stem_gives_centred_decorrelated_unit_variance_tokens():
    from captum_ext.data import ShapesDataset

    td = _script()
    torch.manual_seed(0)
    model = _convstem(td)
    data_kwargs = dict(layout="free", size=32, patch=8)
    init = {"eps": 1e-6, "n_images": 64, "data_seed": 5}
    td.whiten_conv_stem(model, init, data_kwargs)
    data = ShapesDataset(64, 5, **data_kwargs)
    x = torch.stack([data[i][0] for i in range(64)])
    with torch.no_grad():
        model.eval()
        f = model.patch_embed.proj(x).permute(0, 2, 3, 1).reshape(-1, 16).double()
    assert f.mean(0).abs().max() < 1e-4
    cov = torch.cov(f.T)
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=1e-2)
    # the BatchNorm momenta are restored after the statistics pass
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_whiten_conv_stem_refuses_a_patchifying_vit():
    import timm

    td = _script()
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    with pytest.raises(ValueError, match="conv stem ending in a 1x1 Conv2d"):
        td.whiten_conv_stem(model, {"eps": 1e-3, "n_images": 4, "data_seed": 0}, {"size": 32})


def test_forward_tokens_on_a_conv_stem_vit_at_its_size_and_on_local_crops():
    td = _script()
    torch.manual_seed(0)
    model = _convstem(td).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        own = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(td.forward_tokens(model, x), own)
        assert td.forward_tokens(model, torch.rand(2, 3, 16, 16)).shape == (2, 16)


def _literal_sinkhorn(logits, temp, iterations):
    """Sinkhorn-Knopp by explicit loops over rows and columns (float64)."""
    n, k = logits.shape
    q = [[math.exp(logits[i, j].item() / temp) for i in range(n)] for j in range(k)]  # K x N
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(n)]
        q = [[q[j][i] / cols[i] / n for i in range(n)] for j in range(k)]
    return [[q[j][i] * n for j in range(k)] for i in range(n)]


def test_sinkhorn_knopp_matches_the_literal_loops_and_equalises_prototypes():
    td = _script()
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = td.sinkhorn_knopp(logits, temp=0.5, iterations=3)
    want = torch.tensor(_literal_sinkhorn(logits, 0.5, 3), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got.sum(1), torch.ones(6, dtype=torch.float64))
    # Many rounds: every prototype receives the same share of the batch.
    many = td.sinkhorn_knopp(logits, temp=0.5, iterations=200)
    assert torch.allclose(many.sum(0), torch.full((4,), 6 / 4, dtype=torch.float64), atol=1e-6)


def test_dino_loss_with_sinkhorn_centring_uses_the_joint_teacher_batch():
    td = _script()
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    got = td.dino_loss(student, teacher, None, student_temp=0.1, teacher_temp=0.04)
    p_t = td.sinkhorn_knopp(torch.cat(teacher), 0.04).split(3)
    want, terms = 0.0, 0
    for i, pt in enumerate(p_t):
        for j, s in enumerate(student):
            if i != j:
                want += -(pt * torch.log_softmax(s / 0.1, dim=-1)).sum(-1).mean().item()
                terms += 1
    assert abs(got.item() - want / terms) < 1e-10


def test_train_dino_refuses_an_unknown_centring():
    td = _script()
    with pytest.raises(ValueError, match="centering must be 'centre' or 'sinkhorn'"):
        td.train_dino(None, None, td.DINOConfig(centering="mean"), torch.Generator(), steps=1)


def test_koleo_loss_matches_the_nearest_neighbour_formula():
    td = _script()
    f = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = [row / row.norm() for row in f]
    want = 0.0
    for i in range(5):
        nearest = min((x[i] - x[j]).norm().item() for j in range(5) if j != i)
        want -= math.log(nearest + 1e-8)
    assert abs(td.koleo_loss(f).item() - want / 5) < 1e-10
    # Two identical rows make it large; spreading them lowers it.
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    apart = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert td.koleo_loss(same) > td.koleo_loss(apart)
    with pytest.raises(ValueError, match="at least 2 rows"):
        td.koleo_loss(torch.ones(1, 3))


def test_dino_probe_script_runs_a_step_and_reports_accuracies(tmp_path):
    dino_probe = training_script("dino_probe")
    log = tmp_path / "runs.jsonl"
    argv = ["--steps", "1", "--probe-n", "32", "16", "--decode-n", "32", "--log", str(log)]
    argv += ["batch_size=4", "out_dim=16", "n_local=2", "global_scale=0.5,1"]
    result = dino_probe.main(argv)
    assert result["overrides"]["global_scale"] == (0.5, 1.0)
    for key in ("probe_train", "probe_test", "label_test"):
        assert 0.0 <= result[key] <= 1.0
    assert result["label_r2"] <= 1.0 and result["background_r2"] <= 1.0
    assert log.read_text().count("\n") == 1
    with pytest.raises(SystemExit):
        dino_probe.main(["--steps", "0", "no_such_field=1"])


def test_dino_probe_reads_a_trained_backbone_without_training(tmp_path):
    from safetensors.torch import save_file

    from captum_ext.zoo._build import build_model

    td, dino_probe = _script(), training_script("dino_probe")
    rec = {"arch": "zoo_vit_convstem", "library": "timm", "model_kwargs": td._VIT}
    state = {k: v.contiguous() for k, v in build_model(rec).state_dict().items()}
    save_file(state, tmp_path / "b.safetensors")
    argv = ["--backbone", str(tmp_path / "b.safetensors"), "--probe-n", "32", "16"]
    result = dino_probe.main([*argv, "--decode-n", "32", "--steps", "5"])
    assert result["steps"] == 0 and result["backbone"].endswith("b.safetensors")
    assert result["final_loss"] is None


def test_colour_mixing_keeps_range_and_edges_and_parse_field_reads_booleans():
    td = _script()
    x = torch.zeros(4, 3, 8, 8)
    x[:, :, 2:6, 2:6] = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    out = td.augment_colour(x, torch.Generator().manual_seed(1), mix=True)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # a flat region stays flat: colour changes, the square's outline does not move
    assert torch.allclose(out[:, :, 3, 3], out[:, :, 4, 4])
    assert torch.allclose(out[:, :, 0, 0], out[:, :, 7, 7])
    assert td.parse_field(bool, "0") is False and td.parse_field(bool, "true") is True
    assert td.parse_field(tuple, "0.5,1") == (0.5, 1.0) and td.parse_field(int, "3") == 3
    with pytest.raises(ValueError, match="boolean field"):
        td.parse_field(bool, "yes")


def test_dino_overrides_parse_fields_and_refuse_unknown_ones():
    td = _script()
    over = td.config_overrides(["lr=0.001", "colour_mix=1", "global_scale=0.5,1"])
    assert over == {"lr": 0.001, "colour_mix": True, "global_scale": (0.5, 1.0)}
    for bad in ("no_such_field=1", "lr"):
        with pytest.raises(ValueError, match="expected KEY=VALUE with a DINOConfig field"):
            td.config_overrides([bad])


def test_recoloured_views_share_only_the_layout_and_global_size_resamples_them():
    from captum_ext.data import ShapesDataset

    td = _script()
    data = ShapesDataset(8, 3, layout="free", size=32)
    idx = torch.tensor([5, 2, 7])
    plain = td.DINOConfig(n_local=2, recolour=False)
    bases = td._bases(data, idx, plain, torch.Generator().manual_seed(0))
    assert len(bases) == 4 and all(torch.equal(b, bases[0]) for b in bases)
    assert torch.equal(bases[0], torch.stack([data[i][0] for i in idx.tolist()]))
    cfg = td.DINOConfig(n_local=2, recolour=True, global_size=16, local_size=8)
    bases = td._bases(data, idx, cfg, torch.Generator().manual_seed(0))
    assert len(bases) == 4 and bases[0].shape == (3, 3, 32, 32)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(bases[a], bases[b])  # colours and noise differ per view
    # the layout is the images' own: every recolouring renders the dataset's masks
    masks = torch.stack([data[i][2] for i in idx.tolist()]).any(1)
    background = ~masks[..., 1:] & ~masks[..., :-1]  # both horizontal neighbours
    for base in bases:
        step = (base[..., 1:] - base[..., :-1]).abs().amax(1)
        assert step[background].max() < 0.2  # smooth gradient + noise: no edge off the objects
        assert step[masks[..., 1:] ^ masks[..., :-1]].mean() > 0.2  # objects keep their edges
    views = td._views(bases, cfg, torch.Generator().manual_seed(1))
    assert [v.shape[-1] for v in views] == [16, 16, 8, 8]
    assert td.config_overrides(["recolour=1", "global_size=48"]) == {
        "recolour": True,
        "global_size": 48,
    }


def test_an_interrupted_dino_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    from captum_ext.data import ShapesDataset

    td = _script()
    data = ShapesDataset(24, 3, layout="free", size=32)
    cfg = td.DINOConfig(
        batch_size=8, out_dim=16, hidden_dim=16, bottleneck_dim=8, local_size=16, n_local=2
    )

    def run(checkpoint=None, stats=None):
        torch.manual_seed(0)
        model = _convstem(td)
        losses = td.train_dino(
            model, data, cfg, torch.Generator().manual_seed(0), steps=5, progress=False,
            checkpoint=checkpoint, checkpoint_every=2, stats=stats,
        )  # fmt: skip
        return model, losses

    straight, straight_losses = run()
    ck = tmp_path / "state.safetensors"
    calls = {"n": 0}
    views = td._views

    def failing_views(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # during the 4th step: the last checkpoint is the one after step 2
            raise KeyboardInterrupt
        return views(*args)

    monkeypatch.setattr(td, "_views", failing_views)
    with pytest.raises(KeyboardInterrupt):
        run(ck)
    monkeypatch.setattr(td, "_views", views)
    assert ck.is_file()
    stats = {}
    resumed, resumed_losses = run(ck, stats)
    assert stats["resumed_at"] == [2] and stats["seconds"] > 0
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-5)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    # another recipe refuses the checkpoint, in one line
    with pytest.raises(ValueError, match="belongs to another recipe \\(differs in lr\\)"):
        td.train_dino(
            _convstem(td), data, td.replace(cfg, lr=1.0), torch.Generator(), steps=5,
            progress=False, checkpoint=ck,
        )  # fmt: skip
