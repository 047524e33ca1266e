"""The attribution methods, each a Captum ``Attribution`` subclass."""

from captum_ext.attr.attention_map import AttentionMap
from captum_ext.attr.cdam import CDAM, ConceptCDAM

__all__ = ["CDAM", "AttentionMap", "ConceptCDAM"]
