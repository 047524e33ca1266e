"""The evaluation engine on a tiny in-code ViT, CNN and BERT with a handful of benchmark items."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from captum_ext.data import TEXT_VOCAB, shapes, text_rationales
from captum_ext.evaluation import (
    BASELINES,
    DEFAULT_SEED,
    IMAGE_METRICS,
    OPTIONAL_METRICS,
    TEXT_METRICS,
    EvalConfig,
    EvalResult,
    bootstrap_ci,
    centre_gaussian_map,
    evaluate,
    random_map,
)
from captum_ext.evaluation._trained import TRAINED
from captum_ext.registry import METHODS

CLASS_AGNOSTIC = ["random", "centre-gaussian", "rollout", "attention_map"]


def tiny_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=4,
    ).eval()


def mask_oracle(data):
    """A custom "method" whose map is the target class's ground-truth mask."""

    def fn(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = []
        for x, t in zip(images, targets.tolist()):
            (j,) = [j for j in range(len(data)) if torch.equal(data.images[j], x.cpu())]
            out.append(data.masks[j, t].float())
        return torch.stack(out)[:, None]

    return fn


@pytest.fixture(scope="module")
def data():
    d = shapes(6, 11)
    assert (d.labels.sum(1) == 2).sum() >= 2, "the fixture needs two-object images"
    return d


@pytest.fixture(scope="module")
def result(data) -> EvalResult:
    return evaluate(
        tiny_vit(),
        data=data,
        name="tiny-vit",
        steps=8,
        bootstrap=200,
        extra_maps={"oracle": mask_oracle(data)},
    )


def test_rows_for_every_method_and_metric(result):
    methods = [*METHODS, *BASELINES, "oracle"]
    metrics = [k for k in IMAGE_METRICS if k not in OPTIONAL_METRICS]  # ROAD only when asked
    want = {(m, k) for m in methods for k in metrics} - {("tam", "pearson_tam")}
    got = {(r["method"], r["metric"]) for r in result.rows}
    assert got == want
    for r in result.rows:
        assert math.isfinite(r["mean"]), r
        assert r["n"] > 0 and r["model"] == "tiny-vit"
        assert isinstance(r["higher_is_better"], bool | None)
    assert result.get("tiny-vit", "cdam", "deletion_auc")["higher_is_better"] is False
    assert result.get("tiny-vit", "cdam", "pearson_tam")["higher_is_better"] is None


def test_one_map_per_present_class(result, data):
    n_pairs = int(data.labels.sum())
    n_two = int((data.labels.sum(1) == 2).sum())
    assert result.get("tiny-vit", "cdam", "pointing_game")["n"] == n_pairs
    assert result.get("tiny-vit", "cdam", "pointing_game_grid")["n"] == n_pairs
    assert result.get("tiny-vit", "cdam", "discrimination_score")["n"] == n_two
    assert result.meta["tiny-vit"]["n_pairs"] == n_pairs


@pytest.mark.parametrize("method", CLASS_AGNOSTIC)
def test_class_agnostic_maps_score_exactly_half(result, method):
    values, _ = result.values[("tiny-vit", method, "discrimination_score")]
    assert np.all(values == 0.5)


def test_class_discriminative_method_is_not_half(result):
    values, _ = result.values[("tiny-vit", "cdam", "discrimination_score")]
    assert np.any(values != 0.5)


def test_oracle_localises_perfectly(result):
    for metric in (
        "pointing_game",
        "pointing_game_grid",
        "relevance_mass_accuracy",
        "relevance_rank_accuracy",
    ):
        assert result.get("tiny-vit", "oracle", metric)["mean"] == 1.0, metric
    assert result.get("tiny-vit", "oracle", "discrimination_score")["mean"] == 1.0
    # the mask as map: its tied maxima are the mask, so the peak is the object's centre
    for metric in ("peak_dx", "peak_dy"):
        assert result.get("tiny-vit", "oracle", metric)["mean"] == 0.0, metric
    assert result.get("tiny-vit", "random", "pointing_game")["mean"] < 1.0


def test_oracle_at_pixel_resolution(data):
    res = evaluate(
        tiny_vit(),
        methods=[],
        data=data,
        metrics=["pointing_game", "relevance_mass_accuracy"],
        resolution="pixel",
        bootstrap=0,
        extra_maps={"oracle": mask_oracle(data)},
    )
    assert res.get("VisionTransformer", "oracle", "pointing_game")["mean"] == 1.0
    assert res.get("VisionTransformer", "oracle", "relevance_mass_accuracy")["mean"] == 1.0
    assert res.get("VisionTransformer", "centre-gaussian", "relevance_mass_accuracy")["mean"] < 0.5


def test_interval_contains_mean(result):
    for r in result.rows:
        assert r["lo"] <= r["mean"] <= r["hi"], r


def test_bootstrap_seeded():
    v = np.random.default_rng(0).normal(size=50)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(v, seed=3) != bootstrap_ci(v, seed=4)


def test_bootstrap_width_matches_normal_theory():
    v = np.random.default_rng(1).normal(size=400)
    mean, lo, hi = bootstrap_ci(v, n_boot=4000, seed=0)
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)
    assert mean == pytest.approx(v.mean())
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.12)
    assert (lo + hi) / 2 == pytest.approx(mean, abs=0.2 * half)


def test_bootstrap_resamples_groups():
    v = np.random.default_rng(2).normal(size=200)
    twice = np.repeat(v, 2)
    _, lo1, hi1 = bootstrap_ci(v, n_boot=2000, seed=0)
    _, lo2, hi2 = bootstrap_ci(twice, groups=np.repeat(np.arange(200), 2), n_boot=2000, seed=0)
    _, lo3, hi3 = bootstrap_ci(twice, n_boot=2000, seed=0)
    assert (lo2, hi2) == pytest.approx((lo1, hi1))  # duplicates in one group add nothing
    assert (hi3 - lo3) < 0.8 * (hi1 - lo1)  # counted as independent they would narrow it
    m, lo, hi = bootstrap_ci([1.0, float("nan"), 3.0], n_boot=0)
    assert m == 2.0 and math.isnan(lo) and math.isnan(hi)


def test_evaluate_is_deterministic(data):
    kw = dict(methods=["cdam"], data=data, metrics=["relevance_mass_accuracy"], bootstrap=100)
    a = evaluate(tiny_vit(), **kw)
    b = evaluate(tiny_vit(), **kw)
    assert a.rows == b.rows
    c = evaluate(tiny_vit(), bootstrap_seed=1, **kw)
    assert [r["lo"] for r in c.rows] != [r["lo"] for r in a.rows]


def _peak_beside_object(data, k: int):
    """A custom map: one pixel ``k`` px beside the object (right of its rightmost column, or
    left of its leftmost one near the edge), so its distance to the object is exactly ``k``."""

    def fn(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(images), 1, *images.shape[-2:])
        for i, (x, t) in enumerate(zip(images, targets.tolist())):
            (j,) = [j for j in range(len(data)) if torch.equal(data.images[j], x.cpu())]
            ys, xs = torch.nonzero(data.masks[j, t], as_tuple=True)
            edge = xs.max() if xs.max() + k < x.shape[-1] else xs.min()
            col = edge + k if edge == xs.max() else edge - k
            assert 0 <= col < x.shape[-1]
            out[i, 0, ys[xs == edge][0], col] = 1.0
        return out

    return fn


def test_pointing_columns_standard_tolerance_and_patch_grid(data):
    # 32-px images: the standard protocol's tolerance is 2 px, so a peak 2 px beside the
    # object hits and one 3 px beside it misses; both columns have bootstrap intervals.
    maps = {"near2": _peak_beside_object(data, 2), "near3": _peak_beside_object(data, 3)}
    metrics = ["pointing_game", "pointing_game_grid"]
    res = evaluate(
        tiny_vit(), methods=[], data=data, metrics=[*metrics, "peak_dx"], extra_maps=maps
    )
    assert res.get("VisionTransformer", "near2", "pointing_game")["mean"] == 1.0
    assert res.get("VisionTransformer", "near3", "pointing_game")["mean"] == 0.0
    for method in ("near2", "near3", "random"):
        for metric in metrics:
            row = res.get("VisionTransformer", method, metric)
            assert row["higher_is_better"] is True and row["n"] == int(data.labels.sum())
            assert row["lo"] <= row["mean"] <= row["hi"], (method, metric)
    # the grid column is the pooled pointing game, not the pixel one: a peak 3 px beside
    # the object still hits some of the time on the 4 x 4 grid (the object's cells)
    assert res.get("VisionTransformer", "near3", "pointing_game_grid")["mean"] > 0.0
    # peaks beside the object: never at its centre, further out at 3 px than at 2 px
    (d2, _), (d3, _) = (res.values[("VisionTransformer", m, "peak_dx")] for m in maps)
    assert np.all(d2 != 0) and np.all(np.abs(d3) == np.abs(d2) + 1)
    summary = res.meta["VisionTransformer"]["summary"]
    assert "pointing (15 px @224): peak within 2 px of the object at 32 px" in summary


def test_markdown_lists_every_method(result):
    md = result.to_markdown()
    for name in [*METHODS, "oracle"]:
        label = METHODS[name].label if name in METHODS else name
        assert f"| {label} |" in md, label
    assert "| random |" in md and "| centre Gaussian |" in md
    assert "| pointing (15 px @224) ↑ | pointing (patch grid) ↑ |" in md
    assert "deletion ↓" in md and "| r(TAM) |" in md
    assert "### tiny-vit" in md


def test_save_writes_markdown_and_json(result, tmp_path):
    md, js = result.save(tmp_path / "out")
    assert md.read_text() == result.to_markdown()
    loaded = json.loads(js.read_text())
    assert len(loaded["rows"]) == len(result.rows)
    assert loaded["rows"][0].keys() >= {"model", "method", "metric", "mean", "lo", "hi", "n"}
    assert loaded["meta"]["tiny-vit"]["n_images"] == 6


def test_cnn_skips_transformer_methods():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 4),
    ).eval()
    res = evaluate(cnn, data=shapes(3, 2), name="cnn", steps=4, bootstrap=50)
    assert {r["method"] for r in res.rows} == set(BASELINES)
    assert any("Skipped" in note and "CDAM" in note for note in res.notes["cnn"])
    assert "pearson_tam" not in {r["metric"] for r in res.rows}


def test_text_model_with_rationale_oracle():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(TEXT_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    bert = BertForSequenceClassification(cfg).eval()
    d = text_rationales(5, 3)

    def oracle(ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert torch.equal(ids, d.input_ids)
        return d.rationale.float()

    res = evaluate(
        (bert, d), methods=["cdam", "rollout"], bootstrap=50, extra_maps={"oracle": oracle}
    )
    want = {(m, k) for m in ("cdam", "rollout", "random", "oracle") for k in TEXT_METRICS}
    assert {(r["method"], r["metric"]) for r in res.rows} == want
    assert all(math.isfinite(r["mean"]) for r in res.rows)
    assert res.get("BertForSequenceClassification", "oracle", "token_auprc")["mean"] == 1.0
    assert res.get("BertForSequenceClassification", "random", "token_auprc")["mean"] < 1.0


def test_bad_arguments_are_explained(data):
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(tiny_vit(), methods=["lime"], data=data)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(tiny_vit(), data=data, metrics=["accuracy"])
    with pytest.raises(ValueError, match="held-out data"):
        evaluate(tiny_vit())
    with pytest.raises(ValueError, match="clash"):
        evaluate(tiny_vit(), data=data, extra_maps={"random": random_map})


def test_values_equal_a_literal_recomputation(result, data):
    # The random baseline's sparsity and its correlation with TAM, computed by hand: one map
    # per (image, present class) pair, pooled to the 4x4 patch grid, the metric functions of
    # captum_ext.metrics on those grids.
    from captum_ext import TokenAblation
    from captum_ext.evaluation import DEFAULT_SEED
    from captum_ext.metrics import pearson, sparsity

    pi, pc = torch.nonzero(data.labels > 0.5, as_tuple=True)
    noise = random_map(data.images, DEFAULT_SEED)[pi]
    grids = torch.nn.functional.adaptive_avg_pool2d(noise, (4, 4))[:, 0]
    tam = TokenAblation(tiny_vit()).attribute(data.images[pi], target=pc, output="grid")[:, 0]
    got, groups = result.values[("tiny-vit", "random", "sparsity")]
    assert np.array_equal(groups, pi.numpy())
    assert np.allclose(got, sparsity(grids).double().numpy(), rtol=0, atol=1e-12)
    got, _ = result.values[("tiny-vit", "random", "pearson_tam")]
    assert np.allclose(got, pearson(grids, tam).double().numpy(), rtol=0, atol=1e-6)


def test_config_object_equals_keyword_settings(data):
    kw = dict(methods=["cdam"], metrics=["sparsity", "pointing_game"], bootstrap=20, steps=2)
    by_keywords = evaluate(tiny_vit(), data=data, **kw)
    by_config = evaluate(tiny_vit(), config=EvalConfig(**kw), data=data)
    base = EvalConfig(bootstrap=5, metrics=["sparsity"], steps=2)
    overridden = evaluate(
        tiny_vit(), "cdam", config=base, data=data, bootstrap=20, metrics=kw["metrics"]
    )
    assert by_keywords.rows == by_config.rows == overridden.rows
    cdam = [r["metric"] for r in by_config.rows if r["method"] == "cdam"]
    assert cdam == ["pointing_game", "sparsity"]  # table order, not the order asked for


def test_config_checks_every_setting_when_made():
    cfg = EvalConfig(methods=["cdam"], metrics="sparsity", extra_maps={"noise": random_map})
    assert cfg.methods == ("cdam",) and cfg.metrics == ("sparsity",)
    assert cfg.replace() is cfg and cfg.replace(n=8).n == 8 and cfg.n == 64
    with pytest.raises(AttributeError):
        cfg.n = 8  # frozen
    with pytest.raises(TypeError):
        cfg.extra_maps["other"] = random_map  # read-only
    for bad, match in [
        (dict(resolution="patch"), "resolution"),
        (dict(score="probability"), "score"),
        (dict(batch_size=0), "batch_size"),
        (dict(steps=0), "steps"),
        (dict(bootstrap=-1), "bootstrap"),
        (dict(methods=["lime"]), "unknown method"),
        (dict(metrics=["accuracy"]), "unknown metric"),
        (dict(extra_maps={"tam": random_map}), "clash"),
    ]:
        with pytest.raises(ValueError, match=match):
            EvalConfig(**bad)
        with pytest.raises(ValueError, match=match):
            EvalConfig().replace(**bad)
    with pytest.raises(TypeError, match=r"unknown evaluation setting.*'sead'"):
        evaluate("no-such-zoo-model", sead=1)  # refused before anything is loaded


def test_metric_table_reads_the_metrics_registry():
    from captum_ext.evaluation._table import IMAGE_TABLE, TEXT_TABLE
    from captum_ext.metrics import METRICS, peak_offset

    assert tuple(m.name for m in IMAGE_TABLE) == IMAGE_METRICS
    assert tuple(m.name for m in TEXT_TABLE) == TEXT_METRICS
    # Columns computed by a registry function under its own name, or a per-call column of one
    # (AD / IC at one share kept, ROAD in one order, the pointing game on the patch grid) with
    # that call's direction.
    columns = {
        "ad": "average_drop",
        "ic": "increase_in_confidence",
        "road": "road",
        "pointing": "pointing_game",
    }
    directions = {
        "ad": False,
        "ic": True,
        "road_morf": False,
        "road_lerf": True,
        "pointing": True,
    }
    for m in IMAGE_TABLE + TEXT_TABLE:
        if m.name == "pearson_tam":
            continue
        if m.name in ("peak_dx", "peak_dy"):  # a signed shift, not a registered score
            assert m.fn is peak_offset and m.higher_is_better is None and m.needs_masks
            continue
        stem = m.name.rstrip("0123456789").split("_")[0] if m.name not in METRICS else None
        info = METRICS[m.name if stem is None else columns[stem]]
        assert m.fn is info.fn, m.name
        assert m.category == info.category, m.name
        if stem is None:
            assert m.higher_is_better == info.higher_is_better, m.name
        else:
            assert m.higher_is_better is directions.get(m.name, directions.get(stem)), m.name
    assert set(OPTIONAL_METRICS) == {"road_morf", "road_lerf"}
    (tam,) = [m for m in IMAGE_TABLE if m.name == "pearson_tam"]
    assert tam.fn is METRICS["pearson"].fn
    assert tam.higher_is_better is None and tam.reference == "tam"


def test_confidence_and_road_equal_the_metrics_called_directly(data):
    from captum_ext.metrics import ROAD_TTAME_PERCENTAGES, average_drop, increase_in_confidence
    from captum_ext.metrics import road as road_fn

    model = tiny_vit()
    oracle = mask_oracle(data)
    asked = ["ad15", "ic50", "road_morf", "road_lerf"]
    res = evaluate(
        model, methods=[], data=data, metrics=asked, bootstrap=0, extra_maps={"oracle": oracle}
    )
    pi, pc = torch.nonzero(data.labels > 0.5, as_tuple=True)
    x, t = data.images[pi], pc
    maps = oracle(x, t)
    kw = dict(target=t, score="sigmoid", percent=True)
    ad = average_drop(model, x, maps, keep=0.15, **kw)
    ic = increase_in_confidence(model, x, maps, keep=0.5, **kw)
    common = dict(
        percentages=ROAD_TTAME_PERCENTAGES, score="top1", seed=res.meta["VisionTransformer"]["seed"]
    )
    morf = road_fn(model, x, maps, t, order="morf", **common).mean(1)
    lerf = road_fn(model, x, maps, t, order="lerf", **common).mean(1)
    for metric, want in (("ad15", ad), ("ic50", ic), ("road_morf", morf), ("road_lerf", lerf)):
        row = res.get("VisionTransformer", "oracle", metric)
        assert row["mean"] == pytest.approx(float(want.nanmean()), rel=1e-9, abs=1e-9), metric
        assert row["n"] == len(pi)
    assert {r["metric"] for r in res.rows} == set(asked)
    assert "ROAD MoRF / LeRF" in res.meta["VisionTransformer"]["summary"]


def test_zoo_trained_explainer_is_a_method_row():
    """shapes-cnn: transformer methods skipped with the note, T-TAME scored like a method."""
    from captum_ext import zoo

    if "shapes-cnn-ttame" not in zoo.available(kind="explainer"):
        pytest.skip("the zoo of this installation ships no shapes-cnn-ttame")
    kw = dict(n=4, metrics=["pointing_game", "pointing_game_grid", "ad100"], bootstrap=0)
    res = evaluate("shapes-cnn", **kw)
    trained = {
        n
        for n in TRAINED
        if f"shapes-cnn{TRAINED[n].zoo_suffix}" in zoo.available(kind="explainer")
    }
    assert {r["method"] for r in res.rows} == {"ttame", *trained, *BASELINES}
    assert res.get("shapes-cnn", "ttame", "pointing_game")["label"] == "T-TAME"
    assert any("Skipped" in note and "CDAM" in note for note in res.notes["shapes-cnn"])
    assert not {"ttame", "mhex"} & {
        r["method"] for r in evaluate("shapes-cnn", explainers=(), **kw).rows
    }
    # The same maps, asked for directly, give the same pointing games: in pixels with the
    # standard tolerance (2 px at 32 px), and pooled to the 4x4 grid.
    from captum_ext.metrics import pointing_game

    data = shapes(4, DEFAULT_SEED, **zoo.data_kwargs("shapes-cnn"))
    pi, pc = torch.nonzero(data.labels > 0.5, as_tuple=True)
    maps = zoo.load("shapes-cnn-ttame").attribute(data.images[pi], target=pc, output="input")
    grid = torch.nn.functional.adaptive_avg_pool2d(maps.float(), (4, 4))[:, 0]
    masks = torch.nn.functional.adaptive_max_pool2d(data.masks[pi, pc][:, None].float(), (4, 4))
    want = pointing_game(grid, masks[:, 0] > 0).double().mean()
    got = res.get("shapes-cnn", "ttame", "pointing_game_grid")["mean"]
    assert got == pytest.approx(float(want))
    want = pointing_game(maps.float()[:, 0], data.masks[pi, pc], tolerance=2).double().mean()
    assert res.get("shapes-cnn", "ttame", "pointing_game")["mean"] == pytest.approx(float(want))


def test_unknown_trained_explainer_is_refused():
    with pytest.raises(ValueError, match=r"unknown trained explainer.*ttame"):
        EvalConfig(explainers=["mhex-typo"])
    with pytest.raises(ValueError, match="clash"):
        EvalConfig(extra_maps={"ttame": lambda x, t: x})


def test_baseline_maps():
    x = torch.zeros(3, 3, 16, 20)
    r = random_map(x, seed=5)
    assert r.shape == (3, 1, 16, 20)
    assert torch.equal(r, random_map(x, seed=5)) and not torch.equal(r, random_map(x, seed=6))
    assert not torch.equal(r[0], r[1])
    g = centre_gaussian_map(x)
    assert g.shape == (3, 1, 16, 20)
    assert torch.equal(g, g.flip(-1)) and torch.equal(g, g.flip(-2))
    assert g[0, 0, 8, 10] == g.max() and g[0, 0, 0, 0] < 0.2 * g.max()
    assert random_map(torch.zeros(2, 7, dtype=torch.long)).shape == (2, 7)


def test_zoo_names_generate_the_held_out_set(monkeypatch):
    from captum_ext import zoo

    calls = []
    monkeypatch.setattr(zoo, "load", lambda name, device="cpu": calls.append(name) or tiny_vit())
    monkeypatch.setattr(zoo, "data_kwargs", lambda name: {"layout": "free", "max_objects": 1})
    monkeypatch.setattr(
        zoo, "info", lambda name: {"modality": "image", "task": "multilabel", "family": "vit"}
    )
    res = evaluate(
        ["a", "b"], methods=["cdam"], n=3, seed=7, metrics=["sparsity"], bootstrap=10, steps=2
    )
    assert calls == ["a", "b"] and res.models == ["a", "b"]
    assert res.meta["a"]["layout"] == "free" and res.meta["a"]["n_images"] == 3
    assert res.get("b", "cdam", "sparsity")["n"] == 3  # one object per image: one map each
    expected = evaluate(
        tiny_vit(),
        methods=["cdam"],
        data=shapes(3, 7, layout="free", max_objects=1),
        metrics=["sparsity"],
        bootstrap=10,
    )
    assert res.get("a", "cdam", "sparsity")["mean"] == expected.rows[0]["mean"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(data):
    # Continuous metrics only: float32 differences may flip an argmax or a rank.
    metrics = ["relevance_mass_accuracy", "discrimination_score"]
    kw = dict(methods=["cdam", "rollout"], data=data, metrics=metrics, bootstrap=50)
    cpu = evaluate(tiny_vit(), **kw)
    gpu = evaluate(tiny_vit(), device="cuda", **kw)
    for a, b in zip(cpu.rows, gpu.rows):
        assert (a["method"], a["metric"]) == (b["method"], b["metric"])
        assert b["mean"] == pytest.approx(a["mean"], abs=1e-4), a
