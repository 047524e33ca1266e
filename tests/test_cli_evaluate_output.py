"""What ``captum-ext evaluate`` prints: only the requested methods, a header that says what
the data is (never the zoo's benchmark accuracy as if it were the user's images'), one line
per reason a metric is missing, and the shards a ``--dataset`` run computed and reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext import zoo
from captum_ext.cli import main
from captum_ext.data import SHAPE_CLASSES, shapes

MODEL = "shapes-vit"
FAST = ["--n", "2", "--bootstrap", "0", "-q"]
MASK_METRICS = [
    "pointing_game",
    "pointing_game_grid",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "discrimination_score",
    "sparsity",
]


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of the user's own pictures: no labels, no masks, not the model's size."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(root / f"IMG_{i:04d}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """An ImageFolder tree (sub-folders named as the model's classes) of one-object shapes
    images, one of them filed under the wrong class so that top-1 accuracy is below 1."""
    root = tmp_path_factory.mktemp("labelled")
    data = shapes(24, 11, **zoo.data_kwargs(MODEL))
    single = [i for i in range(len(data)) if int(data.labels[i].sum()) == 1][:4]
    for j, i in enumerate(single):
        k = int(data.labels[i].argmax())
        if j == 0:
            k = (k + 1) % len(SHAPE_CLASSES)  # misfiled
        pixels = (data.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        _png(root / SHAPE_CLASSES[k] / f"img{i:02d}.png", pixels)
    return root


def _header(md: str) -> str:
    """The summary line under a model's title."""
    return md.split("\n\n")[1]


def _notes(md: str) -> list[str]:
    return [line[2:] for line in md.splitlines() if line.startswith("- ")]


def _methods(out: Path) -> set[str]:
    return {r["label"] for r in json.loads((out / "metrics.json").read_text())["rows"]}


# --- 1. only the requested methods ------------------------------------------------------------


def test_named_methods_get_no_trained_explainers_nobody_asked_for(tmp_path):
    assert main(["evaluate", "--models", MODEL, "--methods", "cdam", "tam", *FAST,
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    assert _methods(tmp_path / "a") == {"CDAM", "TAM", "random", "centre Gaussian"}


def test_trained_explainers_run_when_named_or_with_all(tmp_path):
    assert main(["evaluate", "--models", MODEL, "--methods", "cdam", "t-tame", *FAST,
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    assert _methods(tmp_path / "a") == {"CDAM", "T-TAME", "random", "centre Gaussian"}
    ds = ["--dataset", "shapes", "--metrics", "sparsity", "--chunk-size", "2"]
    assert main(["evaluate", "--models", MODEL, "--methods", "all", *ds, *FAST,
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    assert {"CDAM", "TAM", "T-TAME", "MHEX"} <= _methods(tmp_path / "b")
    assert main(["evaluate", "--models", MODEL, "--methods", "mhex", *ds, *FAST,
                 "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    assert _methods(tmp_path / "c") == {"MHEX", "random", "centre Gaussian"}


def test_a_named_explainer_the_zoo_lacks_is_noted_not_dropped_silently(tmp_path):
    # With one model such a name is refused in one line; with several, each model gets a note.
    assert main(["evaluate", "--models", "shapes-vit-plain", "--methods", "cdam", "ttame",
                 *FAST, "--out", str(tmp_path / "one")]) == 2  # fmt: skip
    assert not (tmp_path / "one").exists()
    assert main(["evaluate", "--models", MODEL, "shapes-vit-plain", "--methods", "cdam", "ttame",
                 *FAST, "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    notes = _notes((tmp_path / "a" / "metrics.md").read_text())
    assert "T-TAME not evaluated: the zoo ships none fitted to this model." in notes


# --- 2. the header says what the data is ------------------------------------------------------


def test_header_on_the_benchmark_says_the_accuracy_is_the_zoos_record_on_it(tmp_path, capsys):
    assert main(["evaluate", "--models", MODEL, "--methods", "cdam", *FAST,
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    header = _header(capsys.readouterr().out)
    acc = zoo.info(MODEL)["heldout"]["accuracy"]
    assert f"zoo record: exact-set accuracy {acc:.3f} on 2048 held-out images of its shapes " \
        "benchmark (seed 424242), not measured in this run" in header  # fmt: skip
    assert "2 images of the shapes benchmark" in header


def test_header_on_the_users_photos_claims_no_accuracy(photos, tmp_path, capsys):
    assert main(["evaluate", "--models", MODEL, "--dataset", str(photos), "--methods", "cdam",
                 "--metrics", "sparsity", *FAST, "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    header = _header(capsys.readouterr().out)
    acc = zoo.info(MODEL)["heldout"]["accuracy"]
    assert "accuracy" not in header and f"{acc:.3f}" not in header, header
    assert header.startswith(
        "3 images of a folder (no labels: each image explained for the model's top class; "
        "no object masks)"
    )
    meta = json.loads((tmp_path / "a" / "metrics.json").read_text())["meta"][MODEL]
    assert "heldout_accuracy" not in meta and "heldout" not in meta


def test_header_on_labelled_images_gives_the_top1_accuracy_measured_on_them(
    labelled, tmp_path, capsys
):
    from captum_ext.models import load

    loaded = load(f"zoo:{MODEL}")
    files = sorted(labelled.rglob("*.png"))
    with torch.no_grad():
        x = torch.stack([loaded.image_transform(Image.open(f)) for f in files])
        top = loaded.model(x).argmax(1).tolist()
    correct = sum(SHAPE_CLASSES[k] == f.parent.name for k, f in zip(top, files))
    assert 0 < correct < len(files)  # the test can tell a measured value from a record
    assert main(["evaluate", "--models", MODEL, "--dataset", str(labelled), "--methods", "cdam",
                 "--metrics", "sparsity", *FAST, "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    header = _header(capsys.readouterr().out)
    folders = len({f.parent for f in files})
    assert header.startswith(
        f"{len(files)} images of an ImageFolder tree (labels: {folders} class folders; each "
        "image explained for its folder's class; no object masks); "
    )
    assert (
        f"top-1 accuracy on these images {correct / len(files):.3f} "
        f"({correct}/{len(files)}, measured in this run)"
    ) in header
    assert "zoo record" not in header
    meta = json.loads((tmp_path / "a" / "metrics.json").read_text())["meta"][MODEL]
    assert meta["top1_counts"] == [correct, len(files)]


# --- 3. one line per reason a metric is missing -----------------------------------------------


def test_metrics_missing_for_one_reason_share_one_line(photos, tmp_path, capsys):
    assert main(["evaluate", "--models", MODEL, "--dataset", str(photos), "--methods", "cdam",
                 "--metrics", *MASK_METRICS, *FAST, "--chunk-size", "2",
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    notes = _notes(capsys.readouterr().out)
    assert notes == [
        "pointing (15 px @224), pointing (patch grid), mass acc., rank acc. and D not "
        "computed: these images have no object masks."
    ]


def test_the_benchmark_notes_each_missing_metric_with_its_own_reason(tmp_path, capsys):
    # one one-object image: no D (no two-object image), and no TAM for r(TAM)
    data_kwargs = zoo.data_kwargs(MODEL)
    seed = next(s for s in range(100) if shapes(1, s, **data_kwargs).labels.sum() == 1)
    assert main(["evaluate", "--models", MODEL, "--methods", "cdam", "--n", "1", "--seed",
                 str(seed), "--bootstrap", "0", "-q", "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    notes = _notes(capsys.readouterr().out)
    assert notes == [
        "D not computed: no image with two objects.",
        "r(TAM) not computed: TAM was not evaluated on this model.",
    ]


# --- 4. shards computed and reused ------------------------------------------------------------


def test_dataset_run_says_how_many_shards_it_computed_and_reused(photos, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["evaluate", "--models", MODEL, "--dataset", str(photos), "--methods", "cdam",
            "--metrics", "sparsity", "--chunk-size", "2", *FAST, "--out", str(out)]  # fmt: skip

    def last_line() -> str:
        assert main(args) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    tail = f"2 shards in {out}/ ({{}} computed, {{}} reused) and {out / 'index.json'}"
    assert last_line().endswith(tail.format(2, 0))
    assert last_line().endswith(tail.format(0, 2))
    (out / "shard-00001.json").unlink()  # an interrupted shard: computed again
    assert last_line().endswith(tail.format(1, 1))
