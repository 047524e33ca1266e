"""Captum's usual CNN attributions as reference rows: Grad-CAM and Integrated Gradients.

The package's own methods explain transformers; a CNN is explained by the trainable T-TAME
and MHEX, and these two classes give the standard Captum maps to compare them with. Each
wraps one Captum object and returns maps shaped like every other method's, so the command,
the demo and the evaluation use them the same way:

* :class:`GradCAM` — ``captum.attr.LayerGradCam`` on the CNN's last feature stage
  (``adapter_for(model).default_feature_layers()[-1]``, e.g. ``layer4``), ReLU applied,
  upsampled bilinearly to the input (``LayerAttribution.interpolate``): ``(B, 1, H, W)``,
  non-negative;
* :class:`IntegratedGradientsMap` — ``captum.attr.IntegratedGradients`` from the all-zero
  baseline (black for unnormalised images, the mean colour for normalised ones) with ``n_steps`` steps, summed over the colour channels:
  ``(B, 1, H, W)``, signed.

Both accept only models :class:`~captum_ext.adapters.CNNAdapter` recognises (transformers
have the package's own methods) and raise
:class:`~captum_ext.errors.UnsupportedModelError` otherwise. The model is held as the other
methods hold it (:func:`~captum_ext.capture.model_state`: eval mode, gradients on, every
module's mode restored afterwards).

Example::

    from captum_ext.references import GradCAM

    maps = GradCAM(model).attribute(x, target=3)   # (B, 1, H, W)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from captum.attr import Attribution, IntegratedGradients, LayerAttribution, LayerGradCam
from torch import nn

from captum_ext.adapters import CNNAdapter, adapter_for
from captum_ext.attr.base import DocumentedInit
from captum_ext.capture import model_state
from captum_ext.errors import UnsupportedModelError

__all__ = ["DEFAULT_IG_STEPS", "GradCAM", "IntegratedGradientsMap", "Reference"]

DEFAULT_IG_STEPS = 32
"""Steps of :class:`IntegratedGradientsMap` unless ``n_steps`` says otherwise."""


def _cnn_adapter(model: nn.Module, method: str) -> CNNAdapter:
    adapter = adapter_for(model, method=method)
    if not isinstance(adapter, CNNAdapter):
        raise UnsupportedModelError(
            f"{method} is a Captum reference for CNNs; got a {adapter.family}, which the "
            "package's own methods (CDAM, TAM, relevance, rollout, attention map) explain."
        )
    return adapter


def _single(inputs: torch.Tensor | tuple[torch.Tensor, ...], method: str) -> torch.Tensor:
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise ValueError(f"{method}: expected one input tensor, got {len(inputs)}.")
        inputs = inputs[0]
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"{method}: expected images (B, C, H, W), got {shape}.")
    return inputs


class Reference(DocumentedInit, Attribution):
    """Shell of a Captum reference map on a CNN (see :mod:`captum_ext.references`).

    Attributes:
        model: The explained model.
        adapter: Its :class:`~captum_ext.adapters.CNNAdapter`.
        setting: A short description of the setting, e.g. ``"layer4"`` or ``"32 steps"``.
    """

    _method: ClassVar[str] = "Reference"

    def __init__(self, model: nn.Module) -> None:
        self.adapter = _cnn_adapter(model, self._method)
        self.model = self.adapter.model
        super().__init__(self.model)

    @property
    def setting(self) -> str:
        raise NotImplementedError

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        """The maps ``(B, 1, H, W)`` of ``inputs`` for ``target``.

        Args:
            inputs: Images ``(B, C, H, W)`` (or a 1-tuple of them).
            target: Captum target: an int, a list of B ints or a tensor ``(B,)``; ``None`` =
                the predicted class of each image.
            additional_forward_args: Extra positional arguments of the model.

        Returns:
            Maps ``(B, 1, H, W)`` at the input's resolution, detached.

        Raises:
            ValueError: Inputs that are not one batch of images.
        """
        x = _single(inputs, self._method)
        with model_state(self.model, grad=True):
            if target is None:
                with torch.no_grad():
                    args = () if additional_forward_args is None else additional_forward_args
                    args = args if isinstance(args, tuple) else (args,)
                    target = self.model(x, *args).argmax(-1)
            return self._maps(x, target, additional_forward_args).detach()

    def _maps(self, x: torch.Tensor, target: Any, extra: Any) -> torch.Tensor:
        raise NotImplementedError


class GradCAM(Reference):
    """Captum ``LayerGradCam`` on a CNN's last feature stage, upsampled to the input.

    Args:
        model: A CNN (timm or torchvision ResNet, VGG, EfficientNet, ConvNeXt...).
        layer: Module name of the layer to explain at; default the last of
            ``adapter_for(model).default_feature_layers()`` (ResNet: ``layer4``).

    Raises:
        UnsupportedModelError: ``model`` is not a CNN the adapters recognise.
        ValueError: ``layer`` names no module of the model.
    """

    _method: ClassVar[str] = "GradCAM"

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        super().__init__(model)
        name = self.adapter.default_feature_layers()[-1] if layer is None else layer
        try:
            module = self.model.get_submodule(str(name))
        except AttributeError:
            raise ValueError(
                f"GradCAM: layer={name!r} names no module of the model; pass a name from "
                "model.named_modules()."
            ) from None
        self.layer = str(name)
        self._cam = LayerGradCam(self.model, module)

    @property
    def setting(self) -> str:
        """The explained layer (``"layer4"``)."""
        return self.layer

    def _maps(self, x: torch.Tensor, target: Any, extra: Any) -> torch.Tensor:
        maps = self._cam.attribute(
            x, target=target, additional_forward_args=extra, relu_attributions=True
        )
        return LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), "bilinear")


class IntegratedGradientsMap(Reference):
    """Captum ``IntegratedGradients`` from the all-zero baseline, summed over the channels.

    Args:
        model: A CNN (timm or torchvision ResNet, VGG, EfficientNet, ConvNeXt...).
        n_steps: Steps of the integral (default :data:`DEFAULT_IG_STEPS`).
        internal_batch_size: Captum's ``internal_batch_size`` (``None``: all steps of the
            batch in one pass).

    Raises:
        UnsupportedModelError: ``model`` is not a CNN the adapters recognise.
        ValueError: ``n_steps`` or ``internal_batch_size`` below 1.
    """

    _method: ClassVar[str] = "IntegratedGradients"

    def __init__(
        self,
        model: nn.Module,
        n_steps: int = DEFAULT_IG_STEPS,
        internal_batch_size: int | None = None,
    ) -> None:
        super().__init__(model)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"IntegratedGradients: n_steps must be an int >= 1; got {n_steps!r}.")
        if internal_batch_size is not None and (
            isinstance(internal_batch_size, bool)
            or not isinstance(internal_batch_size, int)
            or internal_batch_size < 1
        ):
            raise ValueError(
                "IntegratedGradients: internal_batch_size must be None or an int >= 1; got "
                f"{internal_batch_size!r}."
            )
        self.n_steps = n_steps
        self.internal_batch_size = internal_batch_size
        self._ig = IntegratedGradients(self.model)

    @property
    def setting(self) -> str:
        """The number of steps (``"32 steps"``)."""
        return f"{self.n_steps} steps"

    def _maps(self, x: torch.Tensor, target: Any, extra: Any) -> torch.Tensor:
        maps = self._ig.attribute(
            x,
            target=target,
            additional_forward_args=extra,
            n_steps=self.n_steps,
            internal_batch_size=self.internal_batch_size,
        )
        return maps.sum(1, keepdim=True)
