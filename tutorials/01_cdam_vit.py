# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 1: CDAM and concept-CDAM on a ViT, drawn with Captum
#
# **Run time on CPU:** about 6 s with the full settings below (`python tutorials/01_cdam_vit.py`,
# measured on an idle 2-core machine; most of it is importing torch and drawing the figures). The test suite runs it with
# `CAPTUM_EXT_TUTORIAL_TINY=1` (fewer images and noise samples).
#
# **Setup:** from the repository root, `pip install -e ".[tutorials]"` (the package with
# JupyterLab, nbconvert, ipykernel and ipywidgets), then `jupyter lab tutorials/` and open
# this notebook, or run it whole to an HTML page: `jupyter nbconvert --to html --execute
# tutorials/01_cdam_vit.ipynb --output-dir tutorial-output`.
#
# CDAM (Brocki & Chung 2023) scores each token by `S_i = Σ_j T_ij · ∂f/∂T_ij`, with `T`
# the tokens entering the last self-attention and `f` the raw logit of the class you
# ask about. The sign matters: `S_i > 0` is evidence **for** the class, `S_i < 0`
# evidence **against** it. Because the gradient is taken of one class's logit, the map
# changes with the class: that is what "class-discriminative" means, and what the
# attention map and rollout cannot do.
#
# Everything here is offline: the model is `shapes-vit`, a small timm
# `VisionTransformer` shipped with the package (`captum_ext.zoo`), trained on the
# procedural shapes benchmark (`captum_ext.data`), whose images come with the exact mask
# of every object, so we can check where a map points.

# %%
import copy
import os

import matplotlib.pyplot as plt
import torch
from captum.attr import visualization

from captum_ext import CDAM, ConceptCDAM, zoo
from captum_ext.data import SHAPE_CLASSES, shapes
from captum_ext.metrics import discrimination_score
from captum_ext.viz import image_to_hwc, to_hwc

TINY = os.environ.get("CAPTUM_EXT_TUTORIAL_TINY") == "1"  # set by the test suite
N_IMAGES = 4 if TINY else 16  # two-object images to explain
N_SMOOTH = 4 if TINY else 32  # noise samples of smooth CDAM
N_CONCEPT = 16 if TINY else 64  # images to draw the concept examples from
torch.manual_seed(0)
print(zoo.available())

# %% [markdown]
# ## The model and the data
#
# `zoo.load` returns a plain timm model in eval mode; `zoo.data_kwargs` gives the
# settings of the benchmark it was trained on (32 px images, 8 px patches, objects
# aligned with the patch grid). We take held-out images with **two** objects, so that
# each image has two classes to explain. The model is multi-label: one sigmoid per class.

# %%
model = zoo.load("shapes-vit")
data = shapes(N_IMAGES, seed=2026, min_objects=2, **zoo.data_kwargs("shapes-vit"))
x = data.images  # (N, 3, 32, 32) in [0, 1]
present = data.labels.nonzero()[:, 1].view(N_IMAGES, 2)  # the two classes of each image
class_a, class_b = present[:, 0], present[:, 1]
with torch.no_grad():
    probs = torch.sigmoid(model(x))
for i in range(min(N_IMAGES, 4)):
    a, b = class_a[i].item(), class_b[i].item()
    print(
        f"image {i}: {SHAPE_CLASSES[a]} (sigmoid {probs[i, a]:.2f}), "
        f"{SHAPE_CLASSES[b]} (sigmoid {probs[i, b]:.2f})"
    )

# %% [markdown]
# ## CDAM for both classes in one forward pass
#
# `attribute(x, target=...)` is Captum's signature. `attribute_targets` explains several
# targets from one forward pass and returns them stacked: `(2, N, 1, H, W)`. Maps come
# at the input size (nearest-upsampled from the 4 × 4 patch grid); `output="grid"` or
# `"tokens"` gives the patch-level values.

# %%
cdam = CDAM(model)
maps = cdam.attribute_targets(x, [class_a, class_b])  # (2, N, 1, 32, 32), raw logit units
grid = cdam.attribute(x, target=class_a, output="grid")  # (N, 1, 4, 4)
print(tuple(maps.shape), tuple(grid.shape))
assert torch.allclose(maps[0], cdam.attribute(x, target=class_a), atol=1e-5)

# %% [markdown]
# ## Drawing the maps with Captum's visualizer
#
# `captum_ext.viz.to_hwc` and `image_to_hwc` turn `(B, 1, H, W)` maps and `(B, 3, H, W)`
# images into the `(H, W, C)` arrays `visualize_image_attr` takes. With `sign="all"`
# Captum draws **green = evidence for the class, red = against**, scaled to ±max|map| of
# each map, with a colour bar; this is the same convention every captum_ext figure uses.
# Each row is one image; the two map columns are its two classes.

# %%
rows = min(N_IMAGES, 3)
fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
for i in range(rows):
    image = image_to_hwc(x, i)
    axes[i, 0].imshow(image)
    axes[i, 0].set_title("input")
    axes[i, 0].axis("off")
    for j, cls in enumerate((class_a[i].item(), class_b[i].item())):
        visualization.visualize_image_attr(
            to_hwc(maps[j], i),
            image,
            method="blended_heat_map",
            sign="all",
            show_colorbar=True,
            title=f"CDAM: {SHAPE_CLASSES[cls]}",
            plt_fig_axis=(fig, axes[i, j + 1]),
            use_pyplot=False,
        )
fig.suptitle("green = evidence for the class, red = against; scale ±max|map| per map")
fig.tight_layout()
plt.show()

# %% [markdown]
# The map moves with the class. Read both colours: sometimes the object of the column's
# class is green, and often the clearest mark is the *other* object in red, evidence
# against the column's class (the model has learned that a plus in that cell argues
# against "circle"). Captum's colour bar reads -1..1 because it divides each map by its
# largest absolute value. On this model CDAM tells the classes apart well but localises
# less sharply than TAM or relevance propagation (tutorial 4 and the benchmark table of
# `docs/benchmark.md` compare them). The exact masks let us measure the first part: the **class
# discrimination score D** (`captum_ext.metrics.discrimination_score`) takes the maps of
# both classes and asks how much of each map's positive mass lies on its own object
# rather than on the other one: 1 = every map on its own object, 0.5 = no discrimination
# (any class-agnostic map, such as the attention map, scores exactly 0.5).

# %%
idx = torch.arange(N_IMAGES)
mask_a, mask_b = data.masks[idx, class_a], data.masks[idx, class_b]  # (N, 32, 32) bool
d_score = discrimination_score(maps[0], maps[1], mask_a, mask_b)  # (N,)
print(f"CDAM class discrimination D: {d_score.mean():.2f} (0.5 = class-agnostic)")

# %% [markdown]
# ## Smooth CDAM
#
# The authors' later variants average CDAM over noisy copies of the input
# (`variant="smooth"`) or along a path from a baseline (`variant="integrated"`). Every
# sample explains the same class and draws its noise from the seed alone, so a batch
# equals its single calls.

# %%
smooth = CDAM(model, variant="smooth", n_samples=N_SMOOTH).attribute(x, target=class_a)
_ = visualization.visualize_image_attr(  # returns (figure, axes): kept out of the output
    to_hwc(smooth, 0),
    image_to_hwc(x, 0),
    method="blended_heat_map",
    sign="all",
    show_colorbar=True,
    title=f"smooth CDAM ({N_SMOOTH} samples): {SHAPE_CLASSES[class_a[0].item()]}",
    use_pyplot=True,  # Captum draws the figure with pyplot and shows it
)

# %% [markdown]
# ## Concept CDAM: explaining a similarity instead of a class
#
# `ConceptCDAM` needs an encoder whose forward returns a latent `(B, D)`. For a timm ViT
# that is the same model without its head (`reset_classifier(0)` on a copy, so the
# classifier stays as it was). The concept is the mean latent of a few examples, here
# images holding a single circle; the map then shows which tokens make an image more
# (green) or less (red) similar to "circle", with no class head involved. Here, as with
# the class map above, the other object lowering the similarity is the strongest mark.

# %%
encoder = copy.deepcopy(model)
encoder.reset_classifier(0)  # forward -> pooled latent (B, 64)
circle = SHAPE_CLASSES.index("circle")
pool = shapes(N_CONCEPT, seed=7, **{**zoo.data_kwargs("shapes-vit"), "max_objects": 1})
examples = pool.images[pool.labels[:, circle] == 1]
ccdam = ConceptCDAM(encoder)
concept = ccdam.concept_from_examples(examples)  # (64,), no grad
print(f"{len(examples)} circle examples -> concept {tuple(concept.shape)}")

with_circle = data.labels[:, circle] == 1
xc = x[with_circle]
concept_maps = ccdam.attribute(xc, concept)  # (M, 1, 32, 32)
_ = visualization.visualize_image_attr(  # returns (figure, axes): kept out of the output
    to_hwc(concept_maps, 0),
    image_to_hwc(xc, 0),
    method="blended_heat_map",
    sign="all",
    show_colorbar=True,
    title="concept CDAM: similarity to 'circle'",
    use_pyplot=True,  # Captum draws the figure with pyplot and shows it
)

# %% [markdown]
# ## Check
#
# What this tutorial promised, as assertions (the test suite runs this cell): maps of the
# right shape and finite values, the two classes' maps differ, and CDAM tells the two
# objects apart (D above the 0.5 of a class-agnostic map).

# %%
assert maps.shape == (2, N_IMAGES, 1, 32, 32) and torch.isfinite(maps).all()
assert smooth.shape == (N_IMAGES, 1, 32, 32) and torch.isfinite(smooth).all()
assert concept_maps.shape == (int(with_circle.sum()), 1, 32, 32)
assert torch.isfinite(concept_maps).all()
assert not torch.allclose(maps[0], maps[1])  # class-discriminative
assert d_score.mean() > 0.6, d_score
print("tutorial 1 checks passed")
