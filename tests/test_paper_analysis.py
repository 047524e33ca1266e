"""The CDAM paper's analysis (``benchmarks/paper_analysis.py``) and its report hook.

The helpers (Pearson, sign agreement and its chance level, sparsity, object mass) against
literal float64 loops; the claim list against synthetic numbers (each verdict must follow
them); a tiny run on ``shapes-vit-linear`` for the structure, ranges, markdown, JSON and
figure; ``benchmarks/report.py``'s ``paper_part``.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _import(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


pa = _import("paper_analysis")


def _maps(seed: int = 0, b: int = 6, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, n, generator=g)
    c = torch.randn(b, n, generator=g)
    a[0, :4] = 0.0  # exact zeros: not counted by the sign agreement
    c[1, 3:9] = 0.0
    c[2] = 0.0  # an all-zero map: NaN where undefined
    a[3] = 1.5  # a constant map: r undefined
    return a, c


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def test_pearson_rows_matches_a_float64_loop():
    a, c = _maps()
    got = pa.pearson_rows(a.view(6, 3, 4), c.view(6, 3, 4))
    for i in range(a.shape[0]):
        x, y = [float(v) for v in a[i]], [float(v) for v in c[i]]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxy = sum((u - mx) * (v - my) for u, v in zip(x, y))
        sxx = sum((u - mx) ** 2 for u in x)
        syy = sum((v - my) ** 2 for v in y)
        if sxx == 0 or syy == 0:
            assert math.isnan(got[i])
        else:
            assert got[i].item() == pytest.approx(sxy / math.sqrt(sxx * syy), abs=1e-12)
    assert got.dtype == torch.float64


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.5])
def test_sign_agreement_and_chance_match_a_float64_loop(threshold):
    a, c = _maps(1)
    got = pa.sign_agreement(a, c, threshold)
    chance = pa.chance_agreement(a, c, threshold)
    for i in range(a.shape[0]):
        x, y = [float(v) for v in a[i]], [float(v) for v in c[i]]
        mx, my = max(abs(v) for v in x), max(abs(v) for v in y)

        def counts(v: float, m: float) -> bool:
            return v != 0 and abs(v) >= threshold * m

        kept = [k for k in range(len(x)) if counts(x[k], mx) and counts(y[k], my)]
        if not kept:
            assert math.isnan(got[i]) and math.isnan(chance[i])
            continue
        agree = sum(_sign(x[k]) == _sign(y[k]) for k in kept) / len(kept)
        px = sum(x[k] > 0 for k in kept) / len(kept)
        py = sum(y[k] > 0 for k in kept) / len(kept)
        assert got[i].item() == pytest.approx(agree, abs=1e-12)
        assert chance[i].item() == pytest.approx(px * py + (1 - px) * (1 - py), abs=1e-12)
    assert math.isnan(got[2])  # the all-zero map: no token counts


def test_sign_agreement_of_a_map_with_itself_and_its_negation():
    a, _ = _maps(2)
    a = a[4:]  # rows without zeros
    assert torch.equal(pa.sign_agreement(a, a), torch.ones(2, dtype=torch.float64))
    assert torch.equal(pa.sign_agreement(a, -a), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold"):
        pa.sign_agreement(a, a, 1.5)


def test_sparsity_and_object_mass_match_a_float64_loop():
    a, c = _maps(3)
    objects = torch.zeros(6, 12, dtype=torch.bool)
    objects[:, 2:5] = True
    objects[5, :] = False
    sp = pa.sparsity_share(a.view(6, 3, 4), 0.05)
    om = pa.object_mass(c, objects)
    for i in range(6):
        x = [float(v) for v in a[i]]
        m = max(abs(v) for v in x)
        assert sp[i].item() == pytest.approx(sum(abs(v) < 0.05 * m for v in x) / len(x))
        y = [abs(float(v)) for v in c[i]]
        if sum(y) == 0:
            assert math.isnan(om[i])
        else:
            on = sum(y[k] for k in range(12) if objects[i, k])
            assert om[i].item() == pytest.approx(on / sum(y), abs=1e-12)
    assert om[5].item() == 0.0


def _diffs():
    """Every difference the claims read, with an interval above 0."""
    names = {n for _, _, names in pa.CLAIMS for n in names}
    return {"differences": {n: {"mean": 0.2, "lo": 0.1, "hi": 0.3} for n in names}}


def _verdicts(result):
    return {c["key"]: c["verdict"] for c in pa.claims(result)}


def test_claims_follow_the_numbers():
    assert set(_verdicts(_diffs()).values()) == {"yes"}
    v = _verdicts(
        {
            "differences": {
                **_diffs()["differences"],
                "pearson_tam cdam-relevance": {"mean": -0.3, "lo": -0.4, "hi": -0.2},
                "sparsity cdam-tam": {"mean": 0.0, "lo": -0.1, "hi": 0.1},
                "pearson_am relevance-tam": {"mean": -0.2, "lo": -0.3, "hi": -0.1},
                "object_mass cdam-attention_map": {"mean": 0.0, "lo": -0.1, "hi": 0.1},
            }
        }
    )
    assert v["tam_cdam_over_rp"] == "no"  # RP correlates more with TAM than CDAM does
    assert v["tam_cdam_over_am"] == "yes"
    assert v["cdam_sparsest"] == "inconclusive"  # one interval holds 0, none below
    assert v["am_rp_most"] == "no"  # one of the two differences below 0 is enough
    assert v["inherits_segmentation"] == "yes"  # not worse than AM
    d = _diffs()["differences"]
    d["object_mass cdam-attention_map"] = {"mean": -0.2, "lo": -0.3, "hi": -0.1}
    del d["sign_agreement all-chance"]
    v = _verdicts({"differences": d})
    assert v["inherits_segmentation"] == "no"
    assert v["signs_agree"] == "n/a"
    # the evidence quotes the interval the verdict rests on
    text = pa.claims({"differences": d})[0]["evidence"]
    assert "[+0.10, +0.30]" in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pa")
    argv = ["--models", "shapes-vit-linear", "--n", "6", "--bootstrap", "20", "--steps", "2"]
    argv += ["--samples", "2", "--concept-examples", "2", "--out", str(out), "--no-progress"]
    return out, pa.main(argv)


def test_tiny_run_structure_ranges_and_claims(tiny):
    _, result = tiny
    (m,) = result["models"]
    assert m["model"] == "shapes-vit-linear" and m["n_images"] == 6 and m["grid"] == [4, 4]
    q = m["quantities"]
    for table, keys in (
        ("pearson_tam", ("cdam", "relevance", "attention_map")),
        ("pearson_am", ("cdam", "relevance", "tam")),
    ):
        for k in keys:
            assert -1.0 <= q[table][k]["mean"] <= 1.0
    for table in ("sign_agreement", "sparsity", "object_mass"):
        for k, d in q[table].items():
            assert 0.0 <= d["mean"] <= 1.0, (table, k)
            assert d["lo"] <= d["mean"] <= d["hi"]
    assert set(q["sparsity"]) >= {"cdam", "cdam_smooth", "cdam_integrated", "cdam_concept"}
    for meth in ("cdam", "cdam_concept", "tam", "relevance", "attention_map", "random"):
        assert set(m["metrics"][meth]) >= set(pa.METRICS)
    # the claim list is the one the numbers give
    assert m["claims"] == pa.claims(m)
    assert [c["key"] for c in m["claims"]] == [k for k, _, _ in pa.CLAIMS]
    # r(CDAM, TAM) - r(RP, TAM) is the paired difference of the two means
    d = m["differences"]["pearson_tam cdam-relevance"]["mean"]
    assert d == pytest.approx(
        q["pearson_tam"]["cdam"]["mean"] - q["pearson_tam"]["relevance"]["mean"]
    )


def test_tiny_run_writes_markdown_json_and_figure(tiny):
    out, result = tiny
    md = (out / "paper_analysis.md").read_text()
    assert "| quantity | paper (ImageNet, DINO ViT-S/8) | shapes-vit-linear |" in md
    assert "| r(CDAM, TAM) | 0.44 |" in md and "| sparsity CDAM | 0.84 |" in md
    assert "| r(CDAM, AM) | not found |" in md
    for c in result["models"][0]["claims"]:
        assert f"{c['claim']} → **{c['verdict']}**" in md
    on_disk = json.loads((out / "paper_analysis.json").read_text())
    assert "image" not in on_disk["models"][0]["example"]
    assert on_disk["paper"]["pearson_tam"]["cdam"] == 0.44
    assert (out / "paper_analysis.png").stat().st_size > 10_000


def test_from_json_renders_the_same_markdown_and_the_figure(tiny, tmp_path):
    out, _ = tiny
    copy = tmp_path / "paper_analysis.json"
    copy.write_text((out / "paper_analysis.json").read_text())
    pa.main(["--from-json", str(copy)])
    assert (tmp_path / "paper_analysis.md").read_text() == (out / "paper_analysis.md").read_text()
    assert (tmp_path / "paper_analysis.png").stat().st_size > 10_000


def test_figure_has_one_row_of_example_maps_per_model(tiny, tmp_path):
    from PIL import Image

    _, result = tiny
    second = {**result["models"][0], "model": "renamed"}
    one = pa.figure(result, tmp_path / "one.png")
    two = pa.figure({**result, "models": [*result["models"], second]}, tmp_path / "two.png")
    (w1, h1), (w2, h2) = Image.open(one).size, Image.open(two).size
    assert w1 == w2 and h2 > h1 * 1.3  # a further row of maps, the same columns


def test_run_refuses_unknown_and_non_vit_models():
    with pytest.raises(ValueError, match="not found"):
        pa.run(["no-such-model"], n=2)
    with pytest.raises(ValueError, match="not a ViT"):
        pa.run(["shapes-cnn"], n=2)


def test_report_paper_part_returns_the_section_and_payload(tmp_path):
    report = _import("report")
    md, payload = report.paper_part(
        ["shapes-vit-linear"],
        4,
        10,
        2,
        tmp_path,
        variant_samples=2,
        concept_examples=2,
        progress=False,
    )
    assert md.startswith("## The CDAM paper's analysis")
    assert "example" not in payload["models"][0]
    assert (tmp_path / "paper_analysis.png").is_file()
    json.dumps(payload["models"][0]["quantities"], allow_nan=True)


def test_report_paper_json_part_includes_a_stored_run_without_recomputing(tiny, tmp_path):
    report = _import("report")
    out, _ = tiny
    md, payload = report.paper_json_part(out / "paper_analysis.json", tmp_path)
    assert md.startswith("## The CDAM paper's analysis\n\nComputed by `HF_HUB_OFFLINE=1 python")
    assert "--n 6" in md and "not rerun here" in md
    # the same tables as the stored run's own markdown
    stored = (out / "paper_analysis.md").read_text()
    assert "| r(CDAM, TAM) | 0.44 |" in md
    table = [line for line in stored.splitlines() if line.startswith("| r(CDAM, TAM)")]
    assert table and table[0] in md
    assert payload["models"][0]["model"] == "shapes-vit-linear"
    assert "example" not in payload["models"][0]
    assert (tmp_path / "paper_analysis.png").stat().st_size > 10_000
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match=r"not a paper_analysis\.py result"):
        report.paper_json_part(bad, tmp_path)


def test_default_models_are_the_fine_models_the_zoo_has():
    from captum_ext import zoo

    present = [m for m in pa.FINE_MODELS if m in zoo.available()]
    assert present == list(pa.FINE_MODELS)  # both fine twins ship
    assert pa.default_models() == present


def test_merge_combines_runs_of_different_models_and_refuses_overlaps(tiny, tmp_path):
    out, result = tiny
    other = json.loads((out / "paper_analysis.json").read_text())
    other["models"][0]["model"] = "renamed"
    other["run"] = {**other["run"], "command": "python benchmarks/paper_analysis.py --x"}
    (tmp_path / "b.json").write_text(json.dumps(other))
    merged_out = tmp_path / "merged"
    argv = ["--merge", str(out / "paper_analysis.json"), str(tmp_path / "b.json")]
    merged = pa.main([*argv, "--out", str(merged_out)])
    assert [m["model"] for m in merged["models"]] == ["shapes-vit-linear", "renamed"]
    assert merged["run"]["seconds"] == pytest.approx(2 * result["run"]["seconds"], abs=0.2)
    md = (merged_out / "paper_analysis.md").read_text()
    assert "| quantity | paper (ImageNet, DINO ViT-S/8) | shapes-vit-linear | renamed |" in md
    assert md.count("`HF_HUB_OFFLINE=1 python benchmarks/paper_analysis.py") == 2
    # the merged file is itself a result: --from-json renders it again unchanged
    pa.main(["--from-json", str(merged_out / "paper_analysis.json")])
    assert (merged_out / "paper_analysis.md").read_text() == md
    with pytest.raises(SystemExit, match="shapes-vit-linear in more than one run"):
        pa.main(["--merge", *argv[1:2], *argv[1:2], "--out", str(tmp_path / "x")])
    other["models"][0]["seed"] += 1
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differ in \\(seed, images\\)"):
        pa.main(["--merge", argv[1], str(tmp_path / "c.json"), "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
