"""The tables of methods and trained explainers that cross-cutting tests iterate over.

:data:`METHODS` is derived from :data:`captum_ext.registry.METHODS`, so a method added to the
registry is covered by every cross-cutting test at once; :data:`VARIANTS` adds constructor
options worth a case of their own (ids ``NAME_VARIANT``). :data:`EXPLAINERS` holds the trained
explainers of :data:`captum_ext.registry.TRAINED` (T-TAME, MHEX) with the tiny models they are
tested on and a cheap recipe (``tests/test_explainers.py``); :func:`model_state` is what an
explanation or a fit must leave unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tiny_models
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from captum_ext import TrainingRecipe
from captum_ext.registry import METHODS as REGISTRY
from captum_ext.registry import TRAINED, MethodSpec
from captum_ext.zoo._build import zoo_resnet_s1


@dataclass(frozen=True)
class MethodCase:
    name: str
    make: Callable[[nn.Module], object]
    signed: bool = True
    class_agnostic: bool = False
    call_kwargs: dict = field(default_factory=dict)


VARIANTS: dict[str, dict[str, dict]] = {
    "cdam": {"smooth": {"variant": "smooth", "n_samples": 2}},
}
"""Registry name -> variant id -> constructor kwargs."""


def _cases() -> list[MethodCase]:
    cases = []
    for spec in REGISTRY.values():
        options = {"": {}, **VARIANTS.get(spec.name, {})}
        for variant, kwargs in options.items():
            cases.append(
                MethodCase(
                    f"{spec.name}_{variant}" if variant else spec.name,
                    lambda m, build=spec.build, kw=kwargs: build(m, **kw),
                    spec.signed,
                    spec.class_agnostic,
                )
            )
    return cases


METHODS = _cases()


# ---------------------------------------------------------------------------------------------
# trained explainers


def tiny_cnn() -> nn.Module:
    """A 4-stage timm ResNet (BasicBlock, stride-1 stem) with 4..16 channels."""
    return zoo_resnet_s1(num_classes=tiny_models.NUM_CLASSES, channels=(4, 8, 8, 16))


TINY_CNN = tiny_models.Case("timm_resnet", tiny_cnn, "image")
TINY_VIT = tiny_models.IMAGE_MODELS[0]
TINY_BERT = tiny_models.TEXT_MODELS[0]

LAST_BLOCK = {"timm_resnet": "layer4", "timm_vit": "blocks.1", "bert": "bert.encoder.layer.1"}
"""Tiny model name -> a module late in its forward pass (the failure tests make it raise)."""

Failure = tuple[nn.Module, tuple[str, ...]]


@dataclass(frozen=True)
class ExplainerCase:
    """A trainable explainer of :data:`captum_ext.registry.TRAINED` and how the tests run it.

    Attributes:
        name: Registry name (the test id).
        spec: The registry entry (``spec.build`` is the class).
        models: The tiny models it is tested on.
        kwargs: Constructor options for those models.
        published: The documented ``default_recipe``: epochs, batch size, learning rate.
        fit_recipe: A cheap recipe (one epoch of batches of 4).
        resume_options: The method's ``fit`` options in the resume and torchrun tests.
        failing_parts: ``failing_parts(explainer)``: modules of the explainer's own trained
            module that, made to raise, must make the named calls (``"fit"``,
            ``"attribute"``) raise.
        also: Further calls (``also(explainer, data)``) that must leave the model as it was.
    """

    name: str
    spec: MethodSpec
    models: tuple[tiny_models.Case, ...]
    kwargs: dict
    published: tuple[int, int, float]
    fit_recipe: TrainingRecipe
    resume_options: dict
    failing_parts: Callable[[Any], list[Failure]]
    also: Callable[[Any, Any], object] | None = None

    def build(self, model: nn.Module):
        """An unfitted explainer for ``model``."""
        return self.spec.build(model, **self.kwargs)

    def make(self, model: nn.Module):
        """An explainer for ``model`` declared fitted: it explains with its initial module."""
        return self.build(model).mark_fitted()


def fit_data(case: tiny_models.Case, n: int = 8, dtype=torch.float64, seed: int = 1) -> Dataset:
    """``(inputs, *extra_args, labels)`` examples of ``case`` (T-TAME ignores the labels)."""
    x, extra = tiny_models.make_inputs(case, n, dtype, seed)
    return TensorDataset(x, *extra, torch.arange(n) % tiny_models.NUM_CLASSES)


_CHEAP = TrainingRecipe(epochs=1, batch_size=4, lr=0.05, show_progress=False)

EXPLAINERS = [
    ExplainerCase(
        "ttame",
        TRAINED["ttame"],
        (TINY_CNN, TINY_VIT),
        {"input_size": 32},
        (8, 32, 1e-3),
        _CHEAP,
        {},
        lambda e: [(e.mechanism.convs[-1], ("fit", "attribute"))],
    ),
    ExplainerCase(
        "mhex",
        TRAINED["mhex"],
        (TINY_CNN, TINY_VIT, TINY_BERT),
        {},
        (4, 128, 0.05),
        _CHEAP,
        {"train_backbone": True},
        # a head runs in the training step only; a gate inside the model's forward pass
        lambda e: [(e.network.heads[0], ("fit",)), (e.network.gates[0], ("fit", "attribute"))],
        lambda e, data: e.gradient_similarity(data.tensors),
    ),
]
"""Every trained explainer of the registry (a test fails if one is missing here)."""

EXPLAINER_MODELS = [(e, c) for e in EXPLAINERS for c in e.models]
EXPLAINER_MODEL_IDS = [f"{e.name}-{c.name}" for e, c in EXPLAINER_MODELS]


# ---------------------------------------------------------------------------------------------
# the state of a model that an explanation or a fit must leave as it found it


def model_state(model: nn.Module) -> dict:
    """Modes, fused-attention and attention-implementation flags, gradient checkpointing, hooks,
    ``requires_grad`` flags (all comparable with ``==``)."""
    mods = list(model.modules())
    return {
        "training": [m.training for m in mods],
        "fused": [getattr(m, "fused_attn", None) for m in mods],
        "impl": [getattr(getattr(m, "config", None), "_attn_implementation", None) for m in mods],
        "ckpt": [
            (getattr(m, "grad_checkpointing", None), getattr(m, "gradient_checkpointing", None))
            for m in mods
        ],
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in mods
        ),
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }
