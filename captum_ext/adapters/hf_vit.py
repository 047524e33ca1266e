"""Adapter for HuggingFace ``ViTModel`` / ``ViTForImageClassification``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from captum_ext.adapters._hf import eager_attention, find_layer_list, find_module
from captum_ext.adapters.base import ModelAdapter, Point, register_adapter

__all__ = ["HFViTAdapter"]


def _is_vit_layer(m: nn.Module) -> bool:
    return hasattr(m, "layernorm_before") and hasattr(m, "attention")


def _is_vit_embeddings(m: nn.Module) -> bool:
    return hasattr(m, "patch_embeddings") and hasattr(m, "cls_token")


@register_adapter
class HFViTAdapter(ModelAdapter):
    """HuggingFace ViT (``ViTModel``, ``ViTForImageClassification``, or a module containing one).

    Layers are found by structure (``layernorm_before`` + ``attention``), so
    both the ``vit.encoder.layer`` tree and the ``vit.layers`` tree of
    transformers 5.9+ work. One prefix token (CLS), CLS readout. Attention
    probabilities are the second output of each layer's ``attention`` module
    under eager attention, which :meth:`attention_probabilities` switches on.
    """

    family = "HuggingFace ViT"
    modality = "image"

    def __init__(self, model: nn.Module, readout=None) -> None:
        super().__init__(model, readout)
        self._layers = find_layer_list(self.model, _is_vit_layer)
        self._embeddings = find_module(self.model, _is_vit_embeddings)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            find_module(model, _is_vit_embeddings) is not None
            and find_layer_list(model, _is_vit_layer) is not None
        )

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self._layers)

    @property
    def num_heads(self) -> int:
        attn = self._layers[-1].attention
        inner = getattr(attn, "attention", attn)  # transformers < 5.9 nests ViTSelfAttention
        for name in ("num_attention_heads", "num_heads"):
            if hasattr(inner, name):
                return int(getattr(inner, name))
        return int(self._embeddings.config.num_attention_heads)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self._embeddings.patch_embeddings.patch_size
        return (int(p[0]), int(p[1])) if isinstance(p, tuple | list) else (int(p), int(p))

    def pre_attention_point(self, block: int = -1) -> Point:
        layer = self._layers[block]
        return Point(layer.attention, "input", None, f"layers[{block}].attention input")

    def attention_point(self, block: int) -> Point:
        return Point(self._layers[block].attention, "output", 1, f"layers[{block}].attention")

    def token_point(self) -> Point:
        return Point(self._embeddings, "output", None, "embeddings output")

    def pixel_embedding(self) -> nn.Module:
        return self._embeddings.patch_embeddings

    @contextlib.contextmanager
    def attention_probabilities(self) -> Iterator[None]:
        with eager_attention(self.model):
            yield
