"""Trained explainers of the zoo that take part in an evaluation, by zoo suffix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TRAINED", "TrainedSpec", "zoo_explainers"]


@dataclass(frozen=True)
class TrainedSpec:
    """A kind of trained explainer as the evaluation shows it.

    Attributes:
        name: Row name in the result (``"ttame"``).
        label: Display name (``"T-TAME"``).
        suffix: Zoo suffix: the explainer fitted to zoo model ``NAME`` is ``NAME + suffix``.
        signed: Maps hold positive and negative evidence.
        class_agnostic: The map does not depend on the target.
        paper: Short citation.
    """

    name: str
    label: str
    suffix: str
    signed: bool
    class_agnostic: bool
    paper: str


TRAINED: dict[str, TrainedSpec] = {
    s.name: s
    for s in (
        TrainedSpec("ttame", "T-TAME", "-ttame", False, False, "Ntrougkas et al. 2024"),
        TrainedSpec("mhex", "MHEX", "-mhex", False, False, "Sun & Liò (reconstruction)"),
    )
}
"""Trained explainer kinds by name. MHEX explains its gated network (the zoo model with
trained gates and heads, same held-out accuracy); the faithfulness metrics run the plain
model, so its deletion/insertion/AD/IC/ROAD rows score its maps against the plain model."""


def zoo_explainers(
    model_name: str, names: Any = None, device: Any = "cpu"
) -> dict[str, tuple[TrainedSpec, Any]]:
    """The zoo's trained explainers for zoo model ``model_name``, loaded.

    Args:
        model_name: A zoo model name (``"shapes-cnn"``).
        names: Kinds to load (:data:`TRAINED` names); ``None`` = every kind.
        device: Where to load them.

    Returns:
        ``{name: (spec, explainer)}`` for every requested kind the zoo has an entry
        ``model_name + spec.suffix`` for, in :data:`TRAINED` order.
    """
    from captum_ext import zoo

    shipped = set(zoo.available(kind="explainer"))
    wanted = list(TRAINED) if names is None else [n for n in TRAINED if n in names]
    out: dict[str, tuple[TrainedSpec, Any]] = {}
    for name in wanted:
        spec = TRAINED[name]
        entry = model_name + spec.suffix
        if entry in shipped:
            out[name] = (spec, zoo.load(entry, device=device))
    return out
