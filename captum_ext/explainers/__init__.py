"""Trainable explainers: an attention module fitted to a frozen model, then one forward pass.

Only the shared contract lives here for now (:class:`TrainableExplainer`); T-TAME
(Ntrougkas et al., IEEE Access 2024) and MHEX (Sun & Liò) implement it in their own modules.
Their checkpoints go through :mod:`captum_ext.checkpoint` (safetensors + JSON, verified on
load, never unpickled).
"""

from captum_ext.explainers.base import TrainableExplainer

__all__ = ["TrainableExplainer"]
