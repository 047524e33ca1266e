"""Trainable explainers: a module fitted to the user's model, then one forward pass per batch.

:class:`TTAME` (Ntrougkas et al., IEEE Access 2024) and :class:`MHEX` (Sun & Liò; gates and
deep-supervision heads built into the model) subclass :class:`TrainableExplainer`: ``fit(data,
recipe=TrainingRecipe(...))`` (or ``load``), then Captum's ``attribute(inputs, target,
additional_forward_args)``. Their loss terms are in :mod:`captum_ext.explainers.losses`;
checkpoints go through :mod:`captum_ext.checkpoint` (safetensors + JSON, verified on load,
never unpickled).
"""

from captum_ext.explainers import losses
from captum_ext.explainers.base import TrainableExplainer, TrainingRecipe
from captum_ext.explainers.mhex import MHEX, MHEXNetwork, mhex_step
from captum_ext.explainers.ttame import TTAME, TTAMEMechanism

__all__ = [
    "MHEX",
    "TTAME",
    "MHEXNetwork",
    "TTAMEMechanism",
    "TrainableExplainer",
    "TrainingRecipe",
    "losses",
    "mhex_step",
]
