"""Model adapters: what a model family looks like inside.

``adapter_for(model, kind=...)`` picks the adapter by structure. Protocols:
:class:`ModelAdapter` (every model kind: detection, forward, input checks,
feature points by layer name) and :class:`TransformerAdapter` (blocks,
heads, prefix tokens, patch grid, attention probabilities, readout).
Families: timm ``VisionTransformer`` (incl. DeiT distilled, registers,
``global_pool='avg'``), HuggingFace ViT, HuggingFace BERT/RoBERTa/DistilBERT
(bare, with heads, or inside a user's wrapper module), and CNNs (timm and
torchvision ResNet, VGG, EfficientNet, ConvNeXt: :class:`CNNAdapter`, feature
points only). The HF adapters share one base (``adapters._hf.HFAdapter``).

Families are tried in the order their modules are imported here: the
transformer adapters first, the CNN adapter last.
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

# isort: split
# Registered after the transformer families, so that adapter_for tries them first.
from captum_ext.adapters.cnn import CNNAdapter

__all__ = [
    "CNNAdapter",
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
