"""What the HuggingFace adapters share: finding layers by structure, eager attention, one base.

:class:`HFAdapter` is the base of the HF ViT and BERT-family adapters: a
subclass names two predicates (what a layer and the embeddings module look
like); layers, heads, attention points, the token point and the
eager-attention switch come from here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

from torch import nn

from captum_ext.adapters.base import Point, Readout, TransformerAdapter

__all__ = ["HFAdapter", "eager_attention", "find_layer_list", "find_module"]


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


class HFAdapter(TransformerAdapter):
    """Base of the HuggingFace adapters: layers and embeddings found by structure.

    Subclasses set :meth:`is_layer` and :meth:`is_embeddings`; the attention
    probabilities are the second output of each layer's ``attention`` module
    under eager attention, which :meth:`attention_probabilities` switches on
    (and restores).
    """

    head_attrs: ClassVar[tuple[str, ...]] = ("num_attention_heads", "n_heads", "num_heads")
    """Attribute names of the head count on the inner self-attention module."""

    @staticmethod
    def is_layer(m: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def is_embeddings(m: nn.Module) -> bool:
        raise NotImplementedError

    def __init__(self, model: nn.Module, readout: Readout | None = None) -> None:
        super().__init__(model, readout)
        self._layers = find_layer_list(self.model, self.is_layer)
        self._embeddings = find_module(self.model, self.is_embeddings)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            find_module(model, cls.is_embeddings) is not None
            and find_layer_list(model, cls.is_layer) is not None
        )

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self._layers)

    @property
    def embeddings(self) -> nn.Module:
        return self._embeddings

    @property
    def config(self):
        """The HF config of the outermost HF model inside (``None`` when none carries one)."""
        roots = _hf_roots(self.model)
        return roots[0].config if roots else None

    @property
    def num_heads(self) -> int:
        attn = self._layers[-1].attention
        for inner in (getattr(attn, "self", None), getattr(attn, "attention", None), attn):
            for name in self.head_attrs:
                if inner is not None and hasattr(inner, name):
                    return int(getattr(inner, name))
        cfg = self.config
        return int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_heads", 0)))

    def attention_point(self, block: int) -> Point:
        return Point(self._layers[block].attention, "output", 1, f"layers[{block}].attention")

    def token_point(self) -> Point:
        return Point(self._embeddings, "output", None, "embeddings output")

    @contextlib.contextmanager
    def attention_probabilities(self) -> Iterator[None]:
        with eager_attention(self.model):
            yield
