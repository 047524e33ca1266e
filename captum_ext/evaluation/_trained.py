"""Trained explainers of the zoo that take part in an evaluation, by zoo suffix."""

from __future__ import annotations

from typing import Any

from captum_ext.registry import TRAINED, MethodSpec

__all__ = ["TRAINED", "zoo_explainers"]


def zoo_explainers(
    model_name: str, names: Any = None, device: Any = "cpu"
) -> dict[str, tuple[MethodSpec, Any]]:
    """The zoo's trained explainers for zoo model ``model_name``, loaded.

    Args:
        model_name: A zoo model name (``"shapes-cnn"``).
        names: Kinds to load (:data:`TRAINED` names); ``None`` = every kind.
        device: Where to load them.

    Returns:
        ``{name: (spec, explainer)}`` for every requested kind the zoo has an entry
        ``model_name + spec.zoo_suffix`` for, in :data:`TRAINED` order.
    """
    from captum_ext import zoo

    shipped = set(zoo.available(kind="explainer"))
    wanted = list(TRAINED) if names is None else [n for n in TRAINED if n in names]
    out: dict[str, tuple[MethodSpec, Any]] = {}
    for name in wanted:
        spec = TRAINED[name]
        entry = model_name + spec.zoo_suffix
        if entry in shipped:
            out[name] = (spec, zoo.load(entry, device=device))
    return out
