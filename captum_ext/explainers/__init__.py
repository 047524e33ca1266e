"""Trainable explainers: an attention module fitted to a frozen model, then one forward pass.

The shared contract is :class:`TrainableExplainer`; T-TAME (Ntrougkas et al., IEEE Access
2024) and MHEX (Sun & Liò; :class:`MHEX`, gates and heads built into the model) implement it in
their own modules.
Their checkpoints go through :mod:`captum_ext.checkpoint` (safetensors + JSON, verified on
load, never unpickled).
"""

from captum_ext.explainers.base import TrainableExplainer
from captum_ext.explainers.mhex import MHEX, MHEXNetwork, mhex_step

__all__ = ["MHEX", "MHEXNetwork", "TrainableExplainer", "mhex_step"]
