"""The contract of a trainable explainer (T-TAME, MHEX).

A trainable explainer wraps the user's model, which it never trains: it adds a small module
of its own (T-TAME's attention mechanism over features of three layers; MHEX's attention gates
and deep-supervision heads), fits that module on unlabelled or labelled data, and afterwards
explains a batch with one forward pass. The classes are ``torch.nn.Module`` subclasses (and
Captum ``Attribution`` subclasses) constructed as ``Explainer(model, layers=None,
num_classes=None)``; the wrapped model is not one of their submodules, so
``state_dict()``, ``.to()`` and DDP see only the explainer's own module.

* T-TAME (Ntrougkas et al., IEEE Access 2024; :mod:`captum_ext.explainers.ttame`): ``fit``
  trains on the model's own top-1 prediction (no labels needed) with the loss 1.5 CE + 2 area
  + 0.01 TV, SGD Nesterov and a one-cycle schedule; ``attribute`` returns the
  min-max normalised class map.
* MHEX (Sun & Liò; a reconstruction; :mod:`captum_ext.explainers.mhex`): ``fit``
  trains the gates and heads with CE(final) + Σ λ_l CE(head_l) on labels; ``attribute``
  integrates the per-stage equivalent-matrix CAMs.

Both train through the one loop of ``explainers/_training.py`` (their own step function:
forward passes and loss terms), write checkpoints with
:func:`captum_ext.checkpoint.save_checkpoint` (their own tensors only, never the wrapped
model's) with a record of their configuration and of the wrapped model (class name, a
fingerprint of its parameter names and shapes, feature shapes, number of classes), and refuse
on load a checkpoint made for another model, layer set or class count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from captum_ext.checkpoint import CheckpointPaths

__all__ = ["TrainableExplainer"]

_E = TypeVar("_E", bound="TrainableExplainer")


@runtime_checkable
class TrainableExplainer(Protocol):
    """What T-TAME and MHEX provide beyond ``nn.Module``: fit, attribute, save, load.

    ``isinstance(x, TrainableExplainer)`` checks that the four methods exist (a runtime
    protocol checks names, not signatures).
    """

    def fit(self, data: Iterable[Any], **kwargs: Any) -> list[dict[str, Any]]:
        """Train the explainer's own parameters; the wrapped model stays frozen, in eval mode.

        Args:
            data: Batches, e.g. a ``DataLoader``: an input tensor ``(B, C, H, W)`` per batch,
                or a tuple whose first element is the inputs (labels second, where the method
                uses them).
            **kwargs: The method's recipe (epochs, learning rate, loss weights, device,
                progress bar), each with the published default.

        Returns:
            The history: one dict per epoch (mean loss and loss terms, learning rate, steps,
            images, time; validation numbers when validation data is given).
        """
        ...

    def attribute(
        self,
        inputs: torch.Tensor,
        target: int | list[int] | torch.Tensor | None = None,
        output: str = "input",
    ) -> torch.Tensor:
        """Explain a batch with one forward pass.

        Args:
            inputs: ``(B, C, H, W)`` images.
            target: Captum's target forms; None = the model's top-1 prediction per example.
            output: ``"input"`` for ``(B, 1, H, W)`` maps upsampled to the input size,
                ``"grid"`` for the explainer's own resolution ``(B, 1, h, w)``.

        Returns:
            The maps, shaped as ``output`` says.
        """
        ...

    def save(self, path: str | os.PathLike[str]) -> CheckpointPaths:
        """Write the explainer's own tensors and config with ``save_checkpoint``.

        Args:
            path: Base path of the checkpoint pair (``<path>.safetensors`` + ``<path>.json``).

        Returns:
            The paths written.
        """
        ...

    @classmethod
    def load(cls: type[_E], path: str | os.PathLike[str], model: nn.Module) -> _E:
        """Rebuild an explainer for ``model`` from a checkpoint, verified, never unpickled.

        Args:
            path: Base path of the checkpoint pair (or either file).
            model: The model the checkpoint was made for.

        Returns:
            The explainer, ready to ``attribute``.

        Raises:
            CheckpointError: If the checkpoint is damaged or was made for another model,
                layer set or class count.
        """
        ...
