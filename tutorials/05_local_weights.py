# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 5: your own timm / HuggingFace weights, from local files
#
# **Run time on CPU:** about 8 s (the script, measured on an idle 2-core machine; most of it
# imports); the tiny settings of the
# test suite (`CAPTUM_EXT_TUTORIAL_TINY=1`) explain fewer images.
#
# **Setup:** from the repository root, `pip install -e ".[tutorials]"` (the package with
# JupyterLab, nbconvert, ipykernel and ipywidgets), then `jupyter lab tutorials/` and open
# this notebook, or run it whole to an HTML page: `jupyter nbconvert --to html --execute
# tutorials/05_local_weights.ipynb --output-dir tutorial-output`.
#
# captum_ext never downloads: a model comes from files on your disk. This tutorial writes
# such files itself (there is no internet here), from two models shipped with the package,
# and loads them back the three ways you would load yours:
#
# 1. timm: `timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=...))`;
# 2. HuggingFace: `from_pretrained(folder, local_files_only=True)` on a `save_pretrained`
#    folder;
# 3. `captum_ext.models.load("timm:ARCH", weights=FILE)` / `models.load("hf:FOLDER")`, which
#    does either and also returns the class names and preprocessing (what `captum-ext
#    explain` uses).
#
# Replace the temporary files with your checkpoint and the rest stays the same.

# %%
import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, BertTokenizer
from transformers.utils import logging as hf_logging

from captum_ext import CDAM, RelevancePropagation, TokenAblation, models, zoo
from captum_ext.data import SHAPE_CLASSES, TEXT_VOCAB, shapes

TINY = os.environ.get("CAPTUM_EXT_TUTORIAL_TINY") == "1"  # set by the test suite
N_IMAGES = 2 if TINY else 8
hf_logging.disable_progress_bar()  # no download/shard bars in the notebook
folder = Path(tempfile.mkdtemp(prefix="captum-ext-weights-"))

# %% [markdown]
# ## 1. A timm checkpoint
#
# `shapes-vit-plain` is a timm `vit_tiny_patch16_224` built with a few `timm.create_model`
# arguments (32 px, 8 px patches, width 64, 4 blocks, 4 classes). We write its weights to
# a `.safetensors` file, as you would `save_file(model.state_dict(), ...)` after training.

# %%
info = zoo.info("shapes-vit-plain")
arch, model_kwargs = info["arch"], dict(info["model_kwargs"])
weights = folder / "my_vit.safetensors"
save_file(zoo.load("shapes-vit-plain").state_dict(), str(weights))
print(arch, model_kwargs, "->", weights.name)

# %% [markdown]
# timm reads a local file through `pretrained_cfg_overlay=dict(file=...)`. When your head
# has another number of classes than the architecture's pretrained config (1000 for
# ImageNet archs), also put `num_classes` in the overlay, or timm drops your classifier
# weights and leaves a fresh head.

# %%
model = timm.create_model(
    arch,
    pretrained=True,
    pretrained_cfg_overlay=dict(file=str(weights), num_classes=model_kwargs["num_classes"]),
    **model_kwargs,
).eval()

data = shapes(N_IMAGES, seed=5, **zoo.data_kwargs("shapes-vit-plain"))
with torch.no_grad():
    same = torch.allclose(model(data.images), zoo.load("shapes-vit-plain")(data.images))
print("the reloaded model computes what the original did:", same)

maps = CDAM(model).attribute(data.images, target=data.labels.argmax(1))  # (N, 1, 32, 32)
print(tuple(maps.shape))

# %% [markdown]
# ## 2. The same through `captum_ext.models.load`
#
# `models.load("timm:ARCH", weights=FILE, model_kwargs=...)` builds the same model (it
# sets `num_classes` from the file's head itself) and loads the file strictly: a tensor of
# another shape, one the file lacks or one the model lacks is refused in one line naming
# it, never left at random initialisation. It puts the model in eval mode and returns a
# `LoadedModel`: the module, class names (pass yours for a custom head), whether scores
# are sigmoids or a softmax, and the preprocessing timm's config prescribes.
# `.safetensors` is preferred; `.pt`/`.pth`/`.bin` are read with
# `torch.load(weights_only=True)`, so a file holding pickled objects is refused, never
# unpickled.

# %%
loaded = models.load(
    f"timm:{arch}", weights=weights, model_kwargs=model_kwargs, class_names=SHAPE_CLASSES
)
print(loaded.class_names, loaded.input_size)
print(loaded.preprocessing)

# %% [markdown]
# Mind the preprocessing: `loaded.image_transform` turns a PIL image into the model's input
# with the resize, crop and normalisation of the *architecture's* pretrained config (here
# mean = std = 0.5). That is right for weights fine-tuned from timm's, but this zoo model
# was trained on raw `[0, 1]` pixels, so below we feed it the tensors directly.

# %%
rp = RelevancePropagation(loaded.model).attribute(data.images, target=data.labels.argmax(1))
torch.save(loaded.model.state_dict(), folder / "my_vit.pt")  # a plain state dict
from_pt = models.load(f"timm:{arch}", weights=folder / "my_vit.pt", model_kwargs=model_kwargs)
with torch.no_grad():
    same_pt = torch.equal(from_pt.model(data.images), loaded.model(data.images))
print("rp", tuple(rp.shape), "| .pt file loads the same model:", same_pt)

# %% [markdown]
# ## 3. A HuggingFace folder
#
# `text-bert` is a `BertForSequenceClassification`. `save_pretrained` writes its config
# (with the class names, if you set `id2label`) and weights to a folder; a tokenizer saved
# next to it (here a `BertTokenizer` over the model's 61-word vocabulary) makes the folder
# complete.

# %%
bert_dir = folder / "my-bert"
original = zoo.load("text-bert")
original.config.id2label = {0: "negative", 1: "positive"}
original.config.label2id = {"negative": 0, "positive": 1}
original.save_pretrained(bert_dir)
(folder / "vocab.txt").write_text("\n".join(TEXT_VOCAB) + "\n")
BertTokenizer(str(folder / "vocab.txt")).save_pretrained(bert_dir)
print(sorted(p.name for p in bert_dir.iterdir()))

bert = BertForSequenceClassification.from_pretrained(bert_dir, local_files_only=True).eval()
tokenizer = BertTokenizer.from_pretrained(bert_dir, local_files_only=True)
enc = tokenizer(["the acting was superb", "a dreadful film"], padding=True, return_tensors="pt")
tam = TokenAblation(bert)
scores = tam.attribute(
    enc["input_ids"], target=1, additional_forward_args=(enc["attention_mask"],)
)  # (2, T): logit drop of "positive" when the token is removed
for ids, s in zip(enc["input_ids"], scores):
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    print(" ".join(f"{t}:{v:+.1f}" for t, v in zip(tokens, s.tolist())))

# %% [markdown]
# We used TAM here rather than CDAM on purpose: on such short, one-sided sentences this
# model is saturated (BERT's pooler is a `tanh`), so the gradient CDAM multiplies by is
# close to zero everywhere, while removing "superb" still changes the logit a lot.
# Compare CDAM on a sentence with evidence on both sides in tutorial 2.
#
# `models.load("hf:FOLDER")` reads the same folder, tokenizer and class names included:

# %%
text_model = models.load(f"hf:{bert_dir}")
sentence = text_model.tokenize("the acting was superb")
with torch.no_grad():
    logits = text_model.logits(sentence.input_ids, sentence.attention_mask)
print(text_model.class_names, text_model.probabilities(logits))
hf_scores = TokenAblation(text_model.model).attribute(
    sentence.input_ids, target=1, additional_forward_args=(sentence.attention_mask,)
)

# %% [markdown]
# ## Check

# %%
assert same and same_pt, "the reloaded models must compute what the saved one did"
assert maps.shape == rp.shape == (N_IMAGES, 1, 32, 32)
assert torch.isfinite(maps).all() and torch.isfinite(rp).all()
superb = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist()).index("superb")
dreadful = tokenizer.convert_ids_to_tokens(enc["input_ids"][1].tolist()).index("dreadful")
assert scores[0, superb] > 0 > scores[1, dreadful]  # for positive / against positive
assert torch.allclose(hf_scores[0], scores[0, : hf_scores.shape[1]], atol=1e-4)
assert text_model.class_names[int(logits.argmax())] == "positive"
shutil.rmtree(folder)  # the temporary files
print("tutorial 5 checks passed")
