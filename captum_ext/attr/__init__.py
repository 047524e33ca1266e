"""The attribution methods, each a Captum ``Attribution`` subclass."""

from captum_ext.attr.attention_map import AttentionMap
from captum_ext.attr.cdam import CDAM, ConceptCDAM
from captum_ext.attr.relevance import RelevancePropagation
from captum_ext.attr.rollout import AttentionRollout
from captum_ext.attr.tam import TAM, PassSizing, TokenAblation

__all__ = [
    "CDAM",
    "TAM",
    "AttentionMap",
    "AttentionRollout",
    "ConceptCDAM",
    "PassSizing",
    "RelevancePropagation",
    "TokenAblation",
]
