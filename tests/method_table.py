"""The table of (method, constructor kwargs) that cross-cutting tests iterate over.

Each entry builds an attribution object from a model and says how to call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

import captum_ext


@dataclass(frozen=True)
class MethodCase:
    name: str
    make: Callable[[nn.Module], object]
    signed: bool = True
    class_agnostic: bool = False
    call_kwargs: dict = field(default_factory=dict)


def _optional(name: str):
    return getattr(captum_ext, name, None)


METHODS = [
    MethodCase("cdam", lambda m: captum_ext.CDAM(m)),
    MethodCase("cdam_smooth", lambda m: captum_ext.CDAM(m, variant="smooth", n_samples=2)),
    MethodCase(
        "attention_map", lambda m: captum_ext.AttentionMap(m), signed=False, class_agnostic=True
    ),
]
for _name, _kw, _signed, _agnostic in [
    ("TokenAblation", {}, True, False),
    ("RelevancePropagation", {}, False, False),
    ("AttentionRollout", {}, False, True),
]:
    _cls = _optional(_name)
    if _cls is not None:
        METHODS.append(MethodCase(_name, lambda m, c=_cls, kw=_kw: c(m, **kw), _signed, _agnostic))
