"""Model adapters: what a model family looks like inside.

``adapter_for(model, kind=...)`` picks the adapter by structure. Protocols:
:class:`ModelAdapter` (every model kind: detection, forward, input checks,
feature points by layer name) and :class:`TransformerAdapter` (blocks,
heads, prefix tokens, patch grid, attention probabilities, readout).
Families: timm ``VisionTransformer`` (incl. DeiT distilled, registers,
``global_pool='avg'``), HuggingFace ViT, HuggingFace BERT/RoBERTa/DistilBERT
(bare, with heads, or inside a user's wrapper module). The HF adapters share
one base (``adapters._hf.HFAdapter``).
"""

from captum_ext._scores import model_output_to_tensor
from captum_ext.adapters.base import (
    ModelAdapter,
    Point,
    TransformerAdapter,
    adapter_for,
    register_adapter,
    unwrap_model,
)
from captum_ext.adapters.hf_text import HFTextAdapter
from captum_ext.adapters.hf_vit import HFViTAdapter
from captum_ext.adapters.timm_vit import TimmViTAdapter

__all__ = [
    "HFTextAdapter",
    "HFViTAdapter",
    "ModelAdapter",
    "Point",
    "TimmViTAdapter",
    "TransformerAdapter",
    "adapter_for",
    "model_output_to_tensor",
    "register_adapter",
    "unwrap_model",
]
