"""captum_ext: class-discriminative explanations of transformers and CNNs for Captum."""

from captum_ext.adapters import ModelAdapter, adapter_for
from captum_ext.attr import (
    CDAM,
    TAM,
    AttentionMap,
    AttentionRollout,
    ConceptCDAM,
    RelevancePropagation,
    TokenAblation,
)
from captum_ext.errors import MissingAttentionError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "CDAM",
    "TAM",
    "AttentionMap",
    "AttentionRollout",
    "ConceptCDAM",
    "MissingAttentionError",
    "ModelAdapter",
    "RelevancePropagation",
    "TokenAblation",
    "UnsupportedModelError",
    "__version__",
    "adapter_for",
]
