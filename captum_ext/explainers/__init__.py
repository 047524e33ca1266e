"""Trainable explainers: an attention module fitted to a frozen model, then one forward pass.

:class:`TTAME` (Ntrougkas et al., IEEE Access 2024) implements the shared contract
(:class:`TrainableExplainer`), and so does :class:`MHEX` (Sun & Liò; gates and heads built
into the model, the project's reconstruction). Their loss
terms live in :mod:`captum_ext.explainers.losses`, their one training loop (epochs, SGD and
one-cycle schedule, progress, checkpoints and resume, DDP, autocast) in
``explainers/_training.py``. Checkpoints go through :mod:`captum_ext.checkpoint`
(safetensors + JSON, verified on load, never unpickled).
"""

from captum_ext.explainers import losses
from captum_ext.explainers.base import TrainableExplainer
from captum_ext.explainers.mhex import MHEX, MHEXNetwork, mhex_step
from captum_ext.explainers.ttame import TTAME, TTAMEMechanism

__all__ = [
    "MHEX",
    "TTAME",
    "MHEXNetwork",
    "TTAMEMechanism",
    "TrainableExplainer",
    "losses",
    "mhex_step",
]
