"""captum_ext: class-discriminative explanations of transformers and CNNs for Captum."""

from captum_ext.adapters import ModelAdapter, TransformerAdapter, adapter_for
from captum_ext.attr import (
    CDAM,
    TAM,
    AttentionMap,
    AttentionRollout,
    ConceptCDAM,
    RelevancePropagation,
    TokenAblation,
)
from captum_ext.errors import (
    CheckpointError,
    MissingAttentionError,
    ReentrantCallError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "CDAM",
    "TAM",
    "AttentionMap",
    "AttentionRollout",
    "CheckpointError",
    "ConceptCDAM",
    "MissingAttentionError",
    "ModelAdapter",
    "ReentrantCallError",
    "RelevancePropagation",
    "TokenAblation",
    "TransformerAdapter",
    "UnsupportedModelError",
    "__version__",
    "adapter_for",
]
