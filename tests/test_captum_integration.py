"""captum_ext methods inside Captum: NoiseTunnel, metrics and visualisation."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from captum.attr import NoiseTunnel, visualization
from captum.metrics import infidelity, sensitivity_max
from method_table import METHODS
from tiny_models import IMAGE_MODELS, TEXT_MODELS, build, make_inputs

from captum_ext import CDAM
from captum_ext.viz import figure_grid, html_text, image_to_hwc, text_record, to_hwc

VIT = IMAGE_MODELS[0]


def test_noise_tunnel_averages_cdam_over_noisy_inputs():
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=2)
    cdam = CDAM(model)
    nt = NoiseTunnel(cdam)
    plain = cdam.attribute(x, target=1)
    no_noise = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.0, target=1)
    torch.testing.assert_close(no_noise, plain)

    seen = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        got = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=1)
    finally:
        handle.remove()
    (noisy,) = seen
    assert noisy.shape[0] == 6 and got.shape == (2, 1, 32, 32)
    maps = cdam.attribute(noisy, target=1)
    owner = torch.cdist(noisy.flatten(1), x.flatten(1)).argmin(1)  # which example was noised
    ref = torch.stack([maps[owner == b].mean(0) for b in range(2)])
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, plain)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_sensitivity_max_and_infidelity_run(method):
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=2)
    explainer = method.make(model)
    sens = sensitivity_max(explainer.attribute, x, target=1, n_perturb_samples=2)
    assert sens.shape == (2,) and torch.isfinite(sens).all()

    attr = explainer.attribute(x, target=1)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    infid = infidelity(model, perturb, x, attr.expand_as(x), target=1, n_perturb_samples=2)
    assert infid.shape == (2,) and torch.isfinite(infid).all()


def test_attribute_accepts_and_returns_tuples():
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=2)
    out = CDAM(model).attribute((x,), target=1)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], CDAM(model).attribute(x, target=1))


def test_visualize_image_attr_renders_the_map():
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=1)
    attr = CDAM(model).attribute(x, target=1)
    hwc = to_hwc(attr)
    assert hwc.shape == (32, 32, 1)
    torch.testing.assert_close(torch.from_numpy(hwc[..., 0]), attr[0, 0])
    fig, ax = visualization.visualize_image_attr(
        hwc, image_to_hwc(x.sigmoid()), method="blended_heat_map", sign="all", use_pyplot=False
    )
    assert fig is not None and ax.images


def test_visualize_text_renders_tokens():
    case = TEXT_MODELS[0]
    model = build(case)
    ids, extra = make_inputs(case, batch=1)
    attr = CDAM(model).attribute(ids, target=0, additional_forward_args=extra)
    tokens = [f"tok{i}" for i in ids[0].tolist()]
    rec = text_record(attr[0], tokens, 0.5, 0, 0, 0, mask=extra[0][0])
    html = html_text([rec])
    kept = int(extra[0][0].sum())
    assert html.count("tok") == kept
    assert len(rec.word_attributions) == kept
    assert rec.word_attributions.abs().max() == pytest.approx(1.0)


def test_figure_grid_shape(tmp_path):
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=2)
    maps = {"CDAM": CDAM(model).attribute(x, target=1)}
    fig = figure_grid(x.sigmoid(), maps, row_labels=["a", "b"], masks=torch.zeros(2, 32, 32))
    assert len(fig.axes) == 2 * 3
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_help_shows_each_methods_own_constructor_arguments():
    """help(CDAM) used to show Captum's inherited __init__ text (forward_func, device_ids)."""
    import captum_ext

    names = ["CDAM", "ConceptCDAM", "TokenAblation", "RelevancePropagation"]
    names += ["AttentionRollout", "AttentionMap", "TTAME", "MHEX"]
    for cls in (getattr(captum_ext, n) for n in names):
        doc = cls.__init__.__doc__ or ""
        captum_docs = {
            k.__init__.__doc__ for k in cls.__mro__ if k.__module__.startswith("captum.")
        }
        assert doc not in captum_docs and "device_ids" not in doc, cls.__name__
        assert "Args:" in doc and doc == cls.__init__.__doc__, cls.__name__
