"""Structure helpers shared by the HuggingFace adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

__all__ = ["eager_attention", "find_layer_list", "find_module"]


def find_module(model: nn.Module, pred: Callable[[nn.Module], bool]) -> nn.Module | None:
    """First module (pre-order) satisfying ``pred``."""
    for m in model.modules():
        if pred(m):
            return m
    return None


def find_layer_list(model: nn.Module, pred: Callable[[nn.Module], bool]) -> nn.ModuleList | None:
    """The first ``ModuleList`` whose children all satisfy ``pred``.

    Found by structure, so it works for ``vit.encoder.layer`` (transformers
    < 5.9) and ``vit.layers`` (5.9 and later) alike.
    """
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(pred(c) for c in m):
            return m
    return None


def _hf_roots(model: nn.Module) -> list[nn.Module]:
    """Outermost submodules that carry a HuggingFace config."""
    roots: list[nn.Module] = []
    seen: set[int] = set()
    for m in model.modules():
        if id(m) in seen:
            continue
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            roots.append(m)
            seen.update(id(c) for c in m.modules())
    return roots


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switches every HuggingFace submodel to eager attention and restores it afterwards.

    SDPA and flash attention never form the probability matrix; eager
    attention returns it as the second output of each attention module.
    """
    changed: list[tuple[nn.Module, str]] = []
    try:
        for root in _hf_roots(model):
            prev = root.config._attn_implementation
            if prev == "eager":
                continue
            changed.append((root, prev))
            _set_impl(root, "eager")
        yield
    finally:
        for root, prev in reversed(changed):
            _set_impl(root, prev)


def _set_impl(root: nn.Module, impl: str) -> None:
    setter = getattr(root, "set_attn_implementation", None)
    if callable(setter):
        setter(impl)
    else:  # older transformers: modules read the config at call time
        root.config._attn_implementation = impl
