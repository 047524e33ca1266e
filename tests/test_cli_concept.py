"""``captum-ext explain`` on bare encoders: concept CDAM from ``--concept`` / ``--concept-image``.

Tiny encoders are saved in ``tmp_path`` as a user would have them: sentence-transformers
folders (``modules.json``, ``1_Pooling/config.json``, the HF model at the root or in a
sub-folder), a plain ``BertModel`` folder and a ``ViTModel`` folder. The command's token
scores and maps are compared with :class:`captum_ext.ConceptCDAM` computed here directly,
with the pooling written out in this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext import ConceptCDAM
from captum_ext.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "great", "movie", "not", "good"]
WORDS += ["dog", "cat", "happy", "ran"]
CONCEPTS = ["a happy dog", "a great dog ran"]
TEXTS = ["not a good movie", "a dog", "a cat ran"]


def _modules(transformer_path: str, normalize: bool) -> list[dict]:
    mods = [
        {
            "idx": 0,
            "name": "0",
            "path": transformer_path,
            "type": "sentence_transformers.models.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        mods.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    return mods


def _pooling_config(mode: str) -> dict:
    """``1_Pooling/config.json`` as sentence-transformers writes it."""
    keys = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
    }
    cfg = {
        "word_embedding_dimension": 16,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    cfg[keys[mode]] = True
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Sentence-transformers folders (mean pooling at the root; CLS + Normalize with the model
    in ``0_Transformer``), a plain BertModel, a ViTModel, a BERT classifier and images."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizer,
        ViTConfig,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("concept")
    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizer.from_pretrained(root / "vocab")
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    bert = BertModel(config)
    with torch.no_grad():  # latents that differ clearly between texts
        for p in bert.parameters():
            p.normal_(0, 0.3)

    def st_folder(name: str, sub: str, mode: str, normalize: bool) -> Path:
        folder = root / name
        model_dir = folder / sub if sub else folder
        bert.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        (folder / "modules.json").write_text(json.dumps(_modules(sub, normalize)))
        (folder / "config_sentence_transformers.json").write_text(
            json.dumps({"__version__": {"sentence_transformers": "3.0.1"}})
        )
        (model_dir / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": 24, "do_lower_case": False})
        )
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(_pooling_config(mode)))
        if normalize:
            (folder / "2_Normalize").mkdir()
        return folder

    st_mean = st_folder("st-mean", "", "mean", False)
    st_cls = st_folder("st-cls", "0_Transformer", "cls", True)
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    clf = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 2}))
    clf.save_pretrained(root / "bert-clf")
    tok.save_pretrained(root / "bert-clf")

    torch.manual_seed(1)
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    vit.save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    return {
        "root": root,
        "st_mean": st_mean,
        "st_cls": st_cls,
        "bert": root / "bert",
        "bert_clf": root / "bert-clf",
        "vit": root / "vit",
        **{f"im{i}": root / f"im{i}.png" for i in range(3)},
    }


class _Pooled(torch.nn.Module):
    """The reference latent: mean of the attended tokens, or the first token; unit length
    when ``normalize``."""

    def __init__(self, encoder, mode: str, normalize: bool = False):
        super().__init__()
        self.encoder, self.mode, self.normalize = encoder, mode, normalize

    def forward(self, ids, mask=None):
        out = self.encoder(ids) if mask is None else self.encoder(ids, mask)
        h = out.last_hidden_state
        if self.mode == "cls":
            z = h[:, 0]
        else:
            m = mask[..., None].to(h.dtype)
            z = (h * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(z, dim=-1) if self.normalize else z


def _explain(argv: list[str]) -> int:
    return main(["explain", *argv, "--quiet"])


# --- text encoders --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model_sub", "mode", "normalize"),
    [
        ("st_mean", "", "mean", False),
        ("st_cls", "0_Transformer", "cls", True),
        ("bert", "", "mean", False),
    ],
    ids=["st-mean", "st-cls-normalize-subfolder", "plain-bertmodel"],
)
def test_text_concept_equals_concept_cdam(folders, tmp_path, name, model_sub, mode, normalize):
    """Token scores written by the command equal ConceptCDAM on the same encoder and pooling
    (the folder's: mean, or CLS then Normalize; a plain BertModel: mean), with the concept
    the mean latent of the concept texts."""
    from transformers import BertModel, BertTokenizer

    folder = folders[name]
    out = tmp_path / "out"
    args = ["--model", f"hf:{folder}", "--method", "cdam", "--out", str(out), "--text", *TEXTS]
    for c in CONCEPTS:
        args += ["--concept", c]
    assert _explain(args) == 0

    model_dir = folder / model_sub if model_sub else folder
    tok = BertTokenizer.from_pretrained(model_dir)
    ref = _Pooled(BertModel.from_pretrained(model_dir).eval(), mode, normalize)
    cdam = ConceptCDAM(ref, readout="mean" if mode == "mean" else "cls")

    def enc(text):
        e = tok(text, return_tensors="pt")
        return e["input_ids"], e["attention_mask"]

    latents = []
    for c in CONCEPTS:
        ids, mask = enc(c)
        latents.append(cdam.concept_from_examples(ids, (mask,)))
    concept = torch.stack(latents).mean(0)
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["concept"] == {"texts": CONCEPTS}
    assert pred["encoder"]["pooling"] == [mode] and pred["encoder"]["normalize"] is normalize
    assert "top" not in pred["inputs"][0]
    for i, text in enumerate(TEXTS):
        ids, mask = enc(text)
        want = cdam.attribute(ids, concept, additional_forward_args=(mask,))[0]
        got = np.load(out / f"text{i}_cdam_concept.npy")
        assert got.shape == (ids.shape[1],)
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-6)
        assert np.abs(got).max() > 0
        with torch.no_grad():
            dot = float((ref(ids, mask)[0] * concept).sum())
        entry = pred["inputs"][i]
        assert entry["tokens"] == tok.convert_ids_to_tokens(ids[0].tolist())
        assert entry["similarity"]["dot"] == pytest.approx(dot, rel=1e-5, abs=1e-6)
        assert entry["files"] == [f"text{i}_cdam_concept.npy"]
    names = {p.name for p in out.iterdir()}
    assert {"text.html", "text.png", "attributions.safetensors", "prediction.json"} <= names


def test_image_concept_equals_concept_cdam(folders, tmp_path):
    """A ViTModel folder: --concept-image gives the concept (mean CLS latent of the images),
    --image the inputs; maps equal ConceptCDAM on last_hidden_state[:, 0]."""
    from transformers import ViTImageProcessor, ViTModel

    out = tmp_path / "out"
    argv = ["--model", f"hf:{folders['vit']}", "--method", "cdam", "--out", str(out)]
    argv += ["--image", str(folders["im0"]), str(folders["im1"])]
    argv += ["--concept-image", str(folders["im2"]), str(folders["im0"])]
    assert _explain(argv) == 0

    proc = ViTImageProcessor(size={"height": 32, "width": 32})

    def pixels(key):
        with Image.open(folders[key]) as img:
            return proc(images=img.convert("RGB"), return_tensors="pt")["pixel_values"]

    ref = _Pooled(ViTModel.from_pretrained(folders["vit"]).eval(), "cls")
    cdam = ConceptCDAM(ref)
    concept = cdam.concept_from_examples(torch.cat([pixels("im2"), pixels("im0")]))
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["concept"] == {"images": [str(folders["im2"]), str(folders["im0"])]}
    for key in ("im0", "im1"):
        want = cdam.attribute(pixels(key), concept)[0, 0].detach().numpy()
        got = np.load(out / f"{key}_cdam_concept.npy")
        assert got.shape == (32, 32)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        assert (out / f"{key}_cdam_concept.png").is_file()


def test_pooled_encoder_padding_does_not_change_latents(folders):
    """Every pooling mode of load_encoder's model gives a padded batch the latents each text
    gets alone (padding never counts), as sentence-transformers pools."""
    from captum_ext.models import POOLINGS, load_encoder

    for mode in POOLINGS:
        loaded = load_encoder(f"hf:{folders['bert']}", pooling=mode)
        encs = [loaded.tokenize(t) for t in TEXTS]
        width = max(e.input_ids.shape[1] for e in encs)
        ids = torch.zeros(len(encs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encs):
            ids[i, : e.input_ids.shape[1]] = e.input_ids[0]
            mask[i, : e.input_ids.shape[1]] = 1
        batch = loaded.logits(ids, mask)
        alone = torch.cat([loaded.logits(e.input_ids, e.attention_mask) for e in encs])
        torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5, msg=mode)


# --- refusals: one line, exit 2, nothing written ---------------------------------------------


def _refused(capsys, argv: list[str], out: Path) -> str:
    assert _explain([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


@pytest.mark.parametrize(
    ("name", "inputs", "flag"),
    [
        ("st_mean", ["--text", "a dog"], "--concept TEXT"),
        ("bert", ["--text", "a dog"], "--concept TEXT"),
        ("vit", ["--image", "IMG"], "--concept-image IMG"),
    ],
)
def test_bare_encoder_without_concept_is_refused_before_torch(
    folders, tmp_path, name, inputs, flag
):
    """It used to load for seconds and then say the folder 'holds BertModel; captum_ext needs
    ... a classifier', without naming concept CDAM. Now: one line naming the flag, exit 2,
    nothing written, torch never imported (the folder's config.json is read first)."""
    inputs = [str(folders["im0"]) if v == "IMG" else v for v in inputs]
    out = tmp_path / "out"
    argv = ["explain", "--model", f"hf:{folders[name]}", *inputs, "--method", "cdam"]
    argv += ["--out", str(out)]
    code = (
        "import sys\nfrom captum_ext.cli import main\n"
        f"rc = main({argv!r})\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), rc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "HEAVY [] 2", run.stdout + run.stderr
    err = run.stderr.strip().splitlines()
    assert len(err) == 1, run.stderr
    assert flag in err[0] and "encoder" in err[0] and "concept CDAM" in err[0], err[0]
    assert not out.exists()


@pytest.mark.parametrize("method", ["tam", "all", "relevance"])
def test_methods_other_than_cdam_refused_on_encoders(folders, tmp_path, capsys, method):
    argv = ["--model", f"hf:{folders['st_mean']}", "--text", "a dog", "--concept", "a dog"]
    err = _refused(capsys, [*argv, "--method", method], tmp_path / "out")
    assert f"--method {method}" in err and "cdam only" in err, err


def test_concept_on_a_classifier_is_refused(folders, tmp_path, capsys):
    argv = ["--model", f"hf:{folders['bert_clf']}", "--text", "a dog", "--concept", "a dog"]
    err = _refused(capsys, [*argv, "--method", "cdam"], tmp_path / "out")
    assert "--concept" in err and "BertForSequenceClassification classifier" in err, err
    argv = ["--model", "timm:vit_tiny_patch16_224", "--image", str(folders["im0"])]
    err = _refused(
        capsys, [*argv, "--concept-image", str(folders["im1"]), "--method", "cdam"], tmp_path / "o2"
    )
    assert "--concept-image" in err and "bare encoder" in err, err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--text", "a dog", "--concept-image", "IMG"], "is a text encoder: give the concept"),
        (["--text", "a dog", "--concept", "a dog", "--target", "0"], "--target does not apply"),
        (["--text", "a", "--concept", "a", "--concept-image", "IMG"], "give one kind of concept"),
    ],
    ids=["image-concept-on-text-encoder", "target", "both-concepts"],
)
def test_concept_requests_that_do_not_fit_are_refused(folders, tmp_path, capsys, extra, says):
    extra = [str(folders["im0"]) if v == "IMG" else v for v in extra]
    argv = ["--model", f"hf:{folders['st_mean']}", "--method", "cdam", *extra]
    err = _refused(capsys, argv, tmp_path / "out")
    assert says in err, err


def test_library_load_names_load_encoder(folders):
    """models.load on an encoder folder names the way to explain it; load_encoder refuses a
    classifier folder. Library messages name functions, never command options."""
    from captum_ext.models import ModelLoadError, load, load_encoder

    with pytest.raises(
        ModelLoadError, match=r"BertModel encoder.*load_encoder.*ConceptCDAM"
    ) as err:
        load(f"hf:{folders['st_mean']}")
    assert "--" not in str(err.value)
    with pytest.raises(ModelLoadError, match="not a bare encoder"):
        load_encoder(f"hf:{folders['bert_clf']}")
