"""The table of (method, constructor kwargs) that cross-cutting tests iterate over.

Derived from :data:`captum_ext.registry.METHODS`, so a method added to the registry is covered
by every cross-cutting test at once; :data:`VARIANTS` adds constructor options worth a case of
their own (ids ``NAME_VARIANT``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from captum_ext.registry import METHODS as REGISTRY


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
