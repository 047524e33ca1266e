"""Adapter for HuggingFace ``ViTModel`` / ``ViTForImageClassification``."""

from __future__ import annotations

from torch import nn

from captum_ext.adapters._hf import HFAdapter
from captum_ext.adapters.base import Point, register_adapter

__all__ = ["HFViTAdapter"]


@register_adapter
class HFViTAdapter(HFAdapter):
    """HuggingFace ViT (``ViTModel``, ``ViTForImageClassification``, or a module containing one).

    Layers are found by structure (``layernorm_before`` + ``attention``), so
    both the ``vit.encoder.layer`` tree and the ``vit.layers`` tree of
    transformers 5.9+ work. One prefix token (CLS), CLS readout. Attention
    probabilities are the second output of each layer's ``attention`` module
    under eager attention, which :meth:`attention_probabilities` switches on.
    """

    family = "HuggingFace ViT"
    modality = "image"

    @staticmethod
    def is_layer(m: nn.Module) -> bool:
        return hasattr(m, "layernorm_before") and hasattr(m, "attention")

    @staticmethod
    def is_embeddings(m: nn.Module) -> bool:
        return hasattr(m, "patch_embeddings") and hasattr(m, "cls_token")

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

    def pixel_embedding(self) -> nn.Module:
        return self._embeddings.patch_embeddings
