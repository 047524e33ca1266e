"""Methods by name, for the command line, the demo and the evaluation engine.

``make_method("cdam", model)`` builds the Captum attribution object;
:data:`METHODS` holds what callers need to know about each method (whether its
maps are signed, whether they depend on the target, the paper), :data:`TRAINED`
the same for the trainable explainers, which are used once fitted (the zoo
ships them fitted to its models, under the model's name plus ``zoo_suffix``), and
:data:`REFERENCES` Captum's usual CNN maps (:mod:`captum_ext.references`: Grad-CAM,
Integrated Gradients), reference rows to compare the package's explainers with.
:func:`method_spec` finds a name in any of the three groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from captum.attr import Attribution
from torch import nn

from captum_ext.attr import (
    CDAM,
    AttentionMap,
    AttentionRollout,
    RelevancePropagation,
    TokenAblation,
)
from captum_ext.explainers import MHEX, TTAME
from captum_ext.references import GradCAM, IntegratedGradientsMap

__all__ = [
    "METHODS",
    "REFERENCES",
    "TRAINED",
    "MethodSpec",
    "available_methods",
    "make_method",
    "method_group",
    "method_spec",
]


@dataclass(frozen=True)
class MethodSpec:
    """What a caller needs to know about a method.

    Attributes:
        name: Registry name (``"cdam"``).
        label: Display name (``"CDAM"``).
        build: ``build(model, **kwargs)`` returns the attribution object.
        signed: Maps hold positive and negative evidence (plot with a
            diverging colormap centred at 0).
        class_agnostic: The map does not depend on the target.
        paper: Short citation.
        trained: A trainable explainer: ``build`` gives an unfitted one, to ``fit`` or
            ``load`` before it explains.
        zoo_suffix: For trained explainers, the zoo entry fitted to zoo model ``NAME`` is
            ``NAME + zoo_suffix``.
        reference: A Captum reference (:data:`REFERENCES`), not one of the package's methods.
        unit: What one value of the map is, as the colour bars of
            :func:`captum_ext.viz.save_overlay` and the demo's grids are labelled
            (``docs/methods.md``, "What the numbers mean"); ``"map value"`` when unstated.
    """

    name: str
    label: str
    build: Callable[..., Attribution]
    signed: bool
    class_agnostic: bool
    paper: str
    trained: bool = False
    zoo_suffix: str = ""
    reference: bool = False
    unit: str = "map value"


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec(
            "cdam", "CDAM", CDAM, True, False, "Brocki & Chung 2023", unit="logit × activation"
        ),
        MethodSpec(
            "tam",
            "TAM",
            TokenAblation,
            True,
            False,
            "token ablation (CDAM paper)",
            unit="logit drop",
        ),
        MethodSpec(
            "relevance",
            "Relevance",
            RelevancePropagation,
            False,
            False,
            "Chefer et al. 2021",
            unit="share of relevance",
        ),
        MethodSpec(
            "rollout",
            "Rollout",
            AttentionRollout,
            False,
            True,
            "Abnar & Zuidema 2020",
            unit="attention weight",
        ),
        MethodSpec(
            "attention_map",
            "Attention map",
            AttentionMap,
            False,
            True,
            "baseline",
            unit="attention weight",
        ),
    )
}
"""The registered methods by name (the names ``make_method`` takes; the command offers the same)."""

TRAINED: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec(
            "ttame",
            "T-TAME",
            TTAME,
            False,
            False,
            "Ntrougkas et al. 2024",
            True,
            "-ttame",
            unit="normalised score [0, 1]",
        ),
        MethodSpec(
            "mhex",
            "MHEX",
            MHEX,
            False,
            False,
            "Sun & Liò (reconstruction)",
            True,
            "-mhex",
            unit="normalised score [0, 1]",
        ),
    )
}
"""The trainable explainers by name. MHEX explains its gated network (the model with trained
gates and heads); the faithfulness metrics run the plain model, so its deletion/insertion/AD/
IC/ROAD scores rate its maps against the plain model."""


REFERENCES: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec(
            "gradcam",
            "Captum GradCAM",
            GradCAM,
            False,
            False,
            "Selvaraju et al. 2017",
            reference=True,
            unit="ReLU(gradient-weighted activation)",
        ),
        MethodSpec(
            "ig",
            "Captum IG",
            IntegratedGradientsMap,
            True,
            False,
            "Sundararajan et al. 2017",
            reference=True,
            unit="logit change from zero input",
        ),
    )
}
"""Captum's usual CNN maps, as reference rows (CNNs only): ``gradcam`` (``LayerGradCam`` on
the last feature stage, ReLU, bilinear upsampling) and ``ig`` (``IntegratedGradients``, black
baseline, channel sum). ``make_method`` builds them like the methods."""


def available_methods() -> list[str]:
    """Registry names of every method."""
    return list(METHODS)


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name`` in :data:`METHODS`, :data:`REFERENCES` or :data:`TRAINED`.

    Raises:
        ValueError: No group has ``name`` (the message lists every name).
    """
    for group in (METHODS, REFERENCES, TRAINED):
        if name in group:
            return group[name]
    raise ValueError(
        f"unknown method {name!r}; methods: {', '.join(METHODS)}; Captum references: "
        f"{', '.join(REFERENCES)}; trained explainers: {', '.join(TRAINED)}"
    )


def method_group(name: str) -> str:
    """``"method"``, ``"reference"`` or ``"trained"``: the group of a registered name.

    Raises:
        ValueError: No group has ``name``.
    """
    spec = method_spec(name)
    return "trained" if spec.trained else "reference" if spec.reference else "method"


def make_method(name: str, model: nn.Module, **kwargs) -> Attribution:
    """Builds method ``name`` (of :data:`METHODS` or :data:`REFERENCES`) for ``model``.

    Raises:
        ValueError: ``name`` is neither a registered method nor a reference (the message
            lists them; a trained explainer is built by its class and fitted or loaded).
        UnsupportedModelError: The method does not explain this kind of model.
    """
    spec = METHODS.get(name) or REFERENCES.get(name)
    if spec is None:
        raise ValueError(
            f"unknown method {name!r}; available: {', '.join([*METHODS, *REFERENCES])}"
            + (
                f" ({name} is a trained explainer: fit {TRAINED[name].label} or load it)"
                if name in TRAINED
                else ""
            )
        )
    return spec.build(model, **kwargs)
