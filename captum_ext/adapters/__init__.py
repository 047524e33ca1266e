"""Model adapters: what a model family looks like inside.

``adapter_for(model)`` picks the adapter by structure. Families: timm
``VisionTransformer`` (incl. DeiT distilled, registers, ``global_pool='avg'``),
HuggingFace ViT, HuggingFace BERT/RoBERTa/DistilBERT (bare, with heads, or
inside a user's wrapper module).
"""

from captum_ext.adapters.base import (
    ModelAdapter,
    Point,
    TokenRemoval,
    adapter_for,
    model_output_to_tensor,
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
    "TokenRemoval",
    "adapter_for",
    "model_output_to_tensor",
    "register_adapter",
    "unwrap_model",
]
