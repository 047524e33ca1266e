"""T-TAME: a trainable attention mechanism over three feature layers of a frozen classifier.

Ntrougkas, Gkalelis and Mezaris, "T-TAME: Trainable Attention Mechanism for Explaining
Convolutional Networks and Vision Transformers", IEEE Access 2024 (code: IDT-ITI/T-TAME).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from captum_ext import zoo
from captum_ext._scores import normalise_target
from captum_ext.adapters.base import ModelAdapter, TransformerAdapter, adapter_for
from captum_ext.capture import Hook, check_feature_layers, hooks, model_state
from captum_ext.checkpoint import model_fingerprint
from captum_ext.errors import CheckpointError, UnsupportedModelError
from captum_ext.explainers._training import batch_inputs, frozen_parameters
from captum_ext.explainers.base import (
    TrainableExplainer,
    TrainingRecipe,
    _finite_number,
    backbone_model,
    check_backbone_layout,
    load_tensors,
)
from captum_ext.explainers.losses import ttame_loss

__all__ = ["TTAME", "TTAMEMechanism"]

Layer = str | int
ViTFeatures = Literal["plain", "cls"]


class TTAMEMechanism(nn.Module):
    """T-TAME's attention mechanism: feature maps of L layers in, one map per class out.

    Per branch ``l``: ``y_l = ReLU(BN(conv1x1(F_l)) + F_l)`` (a ``C_l -> C_l`` 1x1 convolution
    with bias, BatchNorm, a skip connection); every ``y_l`` is resized (bilinear,
    ``align_corners=False``) to the spatial size of the first branch, capped at ``max_size``
    per side; the concatenation ``(B, sum C_l, s, s)`` goes through a 1x1 convolution to the
    ``K`` class logit maps ``c``. The attention maps are ``a = sigmoid(c)``.

    The authors' code (``AttentionTTAME``) fixes ``s`` when it is built, for 224 px inputs;
    here ``s`` follows the first branch of each batch (the same at the size it was built for),
    so other input sizes give maps at their own resolution.

    Args:
        channels: ``C_l`` of every branch, shallow to deep.
        num_classes: ``K``.
        max_size: Largest side of the maps (T-TAME: 56).
    """

    def __init__(self, channels: Sequence[int], num_classes: int, max_size: int = 56) -> None:
        super().__init__()
        if not channels:
            raise ValueError("TTAMEMechanism needs at least one feature layer.")
        self.channels = tuple(int(c) for c in channels)
        self.num_classes = int(num_classes)
        self.max_size = int(max_size)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 1) for c in self.channels)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in self.channels)
        self.fuser = nn.Conv2d(sum(self.channels), self.num_classes, 1)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The map size for a first branch of ``height x width``."""
        return min(height, self.max_size), min(width, self.max_size)

    def forward(
        self, features: Sequence[torch.Tensor], classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Class logit maps ``c (B, K, s, s)`` of the feature maps ``[(B, C_l, h_l, w_l), ...]``.

        With ``classes`` ``(B,)``, only the map of each example's class, ``(B, 1, s, s)``
        (the same numbers, without computing the other ``K - 1`` maps).
        """
        if len(features) != len(self.convs):
            raise ValueError(
                f"TTAMEMechanism was built for {len(self.convs)} feature maps; got {len(features)}."
            )
        size = self.output_size(*features[0].shape[-2:])
        ys = [
            F.relu(bn(conv(f)) + f)
            for f, conv, bn in zip(features, self.convs, self.bns, strict=True)
        ]
        if classes is None:
            return self.fuser(torch.cat([_resize(y, size) for y in ys], 1))
        # The fuser and the bilinear resizing are both linear, so they commute: each branch's
        # share of the class map is computed at the branch's resolution, then resized.
        w = self.fuser.weight[classes, :, 0, 0]
        out = self.fuser.bias[classes].view(-1, 1, 1, 1).to(ys[0].dtype)
        start = 0
        for y in ys:
            part = torch.einsum("bc,bchw->bhw", w[:, start : start + y.shape[1]].to(y.dtype), y)
            out = out + _resize(part.unsqueeze(1), size)
            start += y.shape[1]
        return out


def _resize(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resizing (``align_corners=False``) to ``size``; a no-op at that size."""
    if tuple(y.shape[-2:]) == size:
        return y
    if y.device.type == "cpu" and y.shape[1] > 1:  # CPU bilinear: ~10x faster channels-last
        y = y.contiguous(memory_format=torch.channels_last)
    return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class TTAME(TrainableExplainer):
    """T-TAME (Ntrougkas et al., IEEE Access 2024): a trained attention mechanism explains a frozen model.

    The mechanism (:class:`TTAMEMechanism`, :attr:`mechanism`) reads feature maps of three
    layers of the model and produces one logit map per class, ``c (B, K, s, s)``. It is
    trained with :meth:`fit` on unlabelled images: the image is multiplied by the upsampled
    sigmoid map of the model's own top-1 class ``y``, and the model, seeing only that, should
    still predict ``y`` (cross-entropy), with small (area) and smooth (variation) maps
    (:func:`~captum_ext.explainers.losses.ttame_loss`). Explaining is then one forward pass
    (:meth:`attribute`, after :meth:`fit` or :meth:`load`): the logit map ``c[b, target]``
    (before the sigmoid; ``target=None``: the model's top-1 class), min-max normalised per
    image to ``[0, 1]`` (a constant map gives zeros), upsampled bilinearly
    (``align_corners=False``) to the input size as in the authors' evaluation code, the
    mechanism in eval mode. ``output``: ``"input"`` ``(B, 1, H, W)``, ``"like_input"``
    ``(B, C, H, W)``, ``"grid"`` ``(B, 1, s, s)``.

    Feature layers (``layers=None`` gives the adapter's preset, ``default_feature_layers()``;
    every layer is checked to give a map, and a wrong one is reported with the model's
    candidate layers and their shapes):
    CNNs: VGG-16 ``features.16/23/30``, ResNet ``layer2/3/4`` (outputs ``(B, C, h, w)``);
    ViTs (timm, HuggingFace): the tokens entering the self-attention of the last three blocks
    (after the block's pre-attention LayerNorm), prefix tokens dropped, reshaped to the patch
    grid ``(B, D, h, w)``. ``vit_features="cls"`` multiplies every patch token elementwise by
    the CLS token of the same layer, as the authors' code does for T-TAME on ViT-B/16;
    ``"plain"`` uses the patch tokens as they are. Differences from the authors' code: their
    ViT features are the *outputs* of torchvision's encoder layers 9-11 (pass module names,
    e.g. ``layers=["blocks.9", "blocks.10", "blocks.11"]`` for a timm ViT-B, to use those);
    the map size follows the input (see :class:`TTAMEMechanism`); their Lightning code keeps
    the backbone in train mode (BatchNorm statistics move, dropout is on) while here it stays
    in eval mode and comes out bit-identical, unless ``fit(backbone_train_mode=True)``.

    The frozen model is held by the adapter, not registered as a submodule: ``state_dict()``,
    ``.to()``, ``.train()`` and ``DistributedDataParallel`` see only the mechanism, which
    follows the device and floating dtype of the model's features when explaining. It is
    also a Captum ``Attribution`` (``forward_func`` = the model).

    Args:
        model: A classifier ``(B, C, H, W) -> (B, K)`` the adapters support (timm and
            HuggingFace ViTs; timm and torchvision ResNet, VGG, EfficientNet, ConvNeXt), or
            its adapter.
        layers: Feature layers: module names (their outputs) or, for transformers, block
            indices (their pre-attention tokens); ``None`` = the family preset.
        num_classes: ``K``; ``None`` = the size of the model's output (checked when given).
        vit_features: ``"cls"`` or ``"plain"`` (transformers only); ``None`` = ``"cls"`` when
            the model has a prefix (CLS) token, else ``"plain"``.
        input_size: ``H``, ``(H, W)`` or ``(C, H, W)`` of the one probe forward pass that
            measures the feature shapes and ``K``; ``None`` = the model's configured size
            (HuggingFace ``config.image_size``, timm ``pretrained_cfg["input_size"]``), else
            224. Models built for another size than they advertise need it.
        max_size: Largest side of the maps (T-TAME: 56).

    Attributes:
        mechanism: The trainable :class:`TTAMEMechanism`.
        adapter: The model's adapter.
        layers: The feature layers.
        num_classes: ``K``.
        feature_shapes: ``[(C, h, w), ...]`` per branch at ``input_size``.

    Raises:
        UnsupportedModelError: The model is not a supported image classifier.
        ValueError: A layer does not exist or is not a feature map, the probe forward pass
            fails (the message says which ``input_size`` to pass), or ``num_classes``
            disagrees with the model's output.
    """

    _method: ClassVar[str] = "TTAME"
    _record_method: ClassVar[str] = "ttame"
    _label: ClassVar[str] = "T-TAME"
    default_recipe: ClassVar[TrainingRecipe] = TrainingRecipe(epochs=8, batch_size=32, lr=1e-3)
    """The paper's ImageNet recipe: 8 epochs, batch 32, peak learning rate 1e-3."""

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        layers: Sequence[Layer] | None = None,
        num_classes: int | None = None,
        *,
        vit_features: ViTFeatures | None = None,
        input_size: int | Sequence[int] | None = None,
        max_size: int = 56,
    ) -> None:
        super().__init__()
        adapter = adapter_for(model, method=self._method)
        if adapter.modality != "image":
            raise UnsupportedModelError(
                f"TTAME explains image classifiers; got a {adapter.family} ({adapter.modality} "
                "model)."
            )
        self.adapter = adapter
        if layers is not None:
            layers = _check_layers(layers)
        self.vit_features: ViTFeatures = _check_vit_features(adapter, vit_features)
        self.input_size = _input_size(adapter.model, input_size)
        self.max_size = int(max_size)
        probe = self._probe_input()
        self._points = check_feature_layers(adapter, probe, layers, self._method)
        self.layers: list[Layer] = list(
            adapter.default_feature_layers() if layers is None else layers
        )
        shapes, outputs = self._probe(probe)
        if num_classes is not None and num_classes != outputs:
            raise ValueError(
                f"TTAME: num_classes={num_classes} but the model returns {outputs} scores per "
                "image; pass num_classes=None (or the model's number of outputs)."
            )
        self.num_classes = outputs
        self.feature_shapes = shapes
        param = next((p for p in adapter.model.parameters() if p.is_floating_point()), None)
        self.mechanism = TTAMEMechanism([s[0] for s in shapes], outputs, self.max_size).to(
            device=param.device if param is not None else None,
            dtype=param.dtype if param is not None else None,
        )

    # ------------------------------------------------------------------ features
    def _probe_input(self) -> torch.Tensor:
        """Zeros ``(1, C, H, W)`` of ``input_size``, checked against the model's input rules."""
        param = next((p for p in self.adapter.model.parameters() if p.is_floating_point()), None)
        x = torch.zeros(
            1,
            *self.input_size,
            dtype=param.dtype if param is not None else None,
            device=param.device if param is not None else None,
        )
        try:
            self.adapter.check_inputs(x, self._method)
        except ValueError as err:
            c, h, w = self.input_size
            raise ValueError(
                f"{err} TTAME probes the model once with a {c}x{h}x{w} input to measure its "
                "features; pass input_size=(H, W) with a size the model accepts."
            ) from err
        return x

    def _probe(self, x: torch.Tensor) -> tuple[list[tuple[int, int, int]], int]:
        """Feature shapes ``(C, h, w)`` and the number of outputs, from one forward pass."""
        try:
            with model_state(self.adapter.model, grad=False):
                feats, logits = self._capture(x)
        except RuntimeError as err:
            c, h, w = self.input_size
            raise ValueError(
                f"TTAME: the probe forward pass on a {c}x{h}x{w} input failed ({err}); pass "
                "input_size=(H, W) with a size the model accepts."
            ) from err
        if logits.dim() != 2:
            raise ValueError(
                f"TTAME: the model returns shape {tuple(logits.shape)}; expected class scores "
                "(B, K)."
            )
        return [tuple(int(d) for d in f.shape[1:]) for f in feats], int(logits.shape[1])

    def _capture(
        self, x: torch.Tensor, additional_forward_args: Any = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward pass: the branch feature maps ``[(B, C, h, w)]`` and the scores ``(B, K)``."""
        specs = [Hook(p) for p in self._points]
        with hooks(specs):
            logits = self.adapter.forward(x, additional_forward_args)
        return [self._branch(h.tensor, x, h.point.name) for h in specs], logits

    def _branch(self, t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.vit_features == "cls":
            if t.dim() != 3:
                raise ValueError(
                    f"TTAME: vit_features='cls' needs token features (B, N, D) at {name}; got "
                    f"{tuple(t.shape)}. Use vit_features='plain'."
                )
            return self.adapter.feature_map(t, x) * t[:, 0, :, None, None]
        fmap = self.adapter.feature_map(t, x)
        if fmap.dim() != 4:
            raise ValueError(f"TTAME: {name} gives {tuple(fmap.shape)}, not a feature map.")
        return fmap

    def _align(self, feats: Sequence[torch.Tensor]) -> None:
        """Moves the mechanism to the features' device (and dtype, outside autocast)."""
        p = next(self.mechanism.parameters())
        f = feats[0]
        dtype = p.dtype if torch.is_autocast_enabled(f.device.type) else f.dtype
        if p.device != f.device or p.dtype != dtype:
            self.mechanism.to(device=f.device, dtype=dtype)

    def features(
        self, inputs: torch.Tensor, additional_forward_args: Any = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The branch feature maps ``[(B, C_l, h_l, w_l)]`` and the model's scores ``(B, K)``.

        One forward pass of the frozen model in eval mode, without gradients (for a loop of
        your own around :attr:`mechanism`).
        """
        self.adapter.check_inputs(inputs, self._method, additional_forward_args)
        with self._model_state(grad=False):
            return self._capture(inputs, additional_forward_args)

    def forward(self, inputs: torch.Tensor, additional_forward_args: Any = None) -> torch.Tensor:
        """Class logit maps ``c (B, K, s, s)`` (the mechanism in its current mode)."""
        feats, _ = self.features(inputs, additional_forward_args)
        self._align(feats)
        return self.mechanism(feats)

    # ------------------------------------------------------------------ explain
    def _explain(
        self, x: torch.Tensor, targets: list[Any], extra: Any, output: str
    ) -> list[torch.Tensor]:
        """One forward pass of the model; the mechanism's map of each target, formatted."""
        with self._model_state(grad=False):
            feats, logits = self._capture(x, extra)
            self._align(feats)
            was_training = self.mechanism.training
            # eval()/train() set every module's flag (slow nn.Module.__setattr__): skip both
            # when every module already is in eval mode, the usual case at inference.
            switch = any(m.training for m in self.mechanism.modules())
            if switch:
                self.mechanism.eval()
            try:
                maps = [
                    self.mechanism(
                        feats, classes=normalise_target(t, logits, self._method).to(feats[0].device)
                    )
                    for t in targets
                ]
            finally:
                if switch:
                    self.mechanism.train(was_training)
        for c in maps:  # before the min-max normalisation, which would turn NaN into 0
            self._check_finite(c, x)
        return [_format(_minmax(c), x, output) for c in maps]

    # ------------------------------------------------------------------ train
    def fit(
        self,
        data: Any,
        recipe: TrainingRecipe | None = None,
        *,
        val_data: Any = None,
        ce_weight: float = 1.5,
        area_weight: float = 2.0,
        tv_weight: float = 0.01,
        area_power: float = 0.3,
        area_eps: float = 5e-4,
        tv_power: float = 2.0,
        tv_border: float = 0.3,
        loss_maps: Literal["target", "batch"] = "target",
        backbone_train_mode: bool = False,
    ) -> list[dict[str, Any]]:
        """Trains the mechanism on the model's own top-1 predictions (no labels needed).

        Per batch: one forward pass of the frozen model gives the features and ``y =
        argmax``; ``a = sigmoid(mechanism(features))``; the input is multiplied by
        ``a[b, y_b]`` upsampled bilinearly to the input size and the model runs again;
        ``loss = ce_weight * CE(logits', y) + area_weight * area(a_y) + tv_weight *
        variation(a_y)`` (:mod:`captum_ext.explainers.losses`). SGD with Nesterov momentum,
        weight decay on weights only (the authors' code also decays BatchNorm weights), a
        one-cycle schedule peaking at ``lr``; the defaults are the paper's ImageNet recipe.
        The model stays in eval mode and comes out bit-identical (parameters and BatchNorm
        statistics; its ``requires_grad`` flags are switched off for each step and restored).

        Which maps enter the area and variation terms (``loss_maps``): ``"target"`` (default)
        uses ``a[b, y_b]`` ``(B, 1, s, s)``, the map of each image's explained class, as the
        paper's loss is written; ``"batch"`` uses ``a[:, y]`` ``(B, B, s, s)``, every image's
        maps of every class predicted in the batch, which is what the authors' code computes
        with its default ``masking="random"`` (the variation term, normalised by ``B`` only,
        then grows with the batch size). The masked forward pass always uses ``a[b, y_b]``.

        Runs under ``torchrun`` unchanged: with several processes the mechanism is wrapped in
        ``DistributedDataParallel`` and ``recipe.batch_size`` is the global batch.

        Args:
            data: ``Dataset``, ``DataLoader`` or tensor yielding images, or tuples whose first
                item is the images (labels, if any, are ignored).
            recipe: Schedule, device, checkpoints and processes
                (:class:`~captum_ext.explainers.TrainingRecipe`); unset ``epochs``,
                ``batch_size`` and ``lr`` come from :attr:`default_recipe` (8, 32, 1e-3).
                SGD and ``OneCycleLR`` settings: momentum cycles 0.95 -> 0.85 -> 0.95 while
                ``cycle_momentum`` (``OneCycleLR``'s default, also in the authors' code).
            val_data: Images for Average Drop / Increase in Confidence at 100/50/15 % after
                every epoch (:func:`captum_ext.metrics.average_drop_ttame`), reported as
                ``val_AD100``, ``val_IC100``, ... in the history.
            ce_weight: Weight of the cross-entropy term (this and the other loss defaults
                are the authors' code's).
            area_weight: Weight of the area term (small maps).
            tv_weight: Weight of the variation term (smooth maps).
            area_power: Exponent of the area term, the mean of ``(a + eps) ** power``.
            area_eps: Added to the maps before the area term's exponent.
            tv_power: Exponent of the variation term's differences of adjacent cells.
            tv_border: Weight of the variation term's penalty on the maps' edge cells (0: off).
            loss_maps: ``"target"`` (each image's map of its explained class, as the paper
                writes the loss) or ``"batch"`` (every image's maps of every class predicted
                in the batch, as the authors' code computes it); see above.
            backbone_train_mode: Run the model in train mode during fit, as the authors'
                Lightning code does (its BatchNorm statistics then change).

        Returns:
            One dict per epoch: ``epoch``, ``loss``, ``ce``, ``area``, ``tv`` (epoch means,
            unweighted terms), ``lr``, ``steps``, ``images``, ``time_s`` and the validation
            numbers.

        Raises:
            ValueError: A loss option that is not a finite number in its range
                (``ce_weight``, ``area_weight``, ``tv_weight``, ``area_eps``, ``tv_border``
                ``>= 0``, the three weights not all 0; ``area_power``, ``tv_power`` ``> 0``);
                images that are not floating point (T-TAME trains on float images as the
                model takes them, e.g. normalised: convert uint8 images first) or hold NaN or
                inf; empty data.
            TypeError: ``data`` or ``val_data`` is not a tensor, Dataset or DataLoader (e.g.
                a folder name: wrap the folder in a Dataset such as torchvision's
                ``ImageFolder``).
            FloatingPointError: A step's loss, or the mechanism after a step, is not finite
                (inputs far outside the model's range, a learning rate too high): training
                stops with the mechanism and optimiser as they were before that step.
            RuntimeError: Under ``torch.inference_mode()`` (``torch.no_grad()`` is fine: fit
                enables gradients itself).
        """
        if loss_maps not in ("target", "batch"):
            raise ValueError(
                f"TTAME.fit: loss_maps must be 'target' or 'batch'; got {loss_maps!r}."
            )
        if not isinstance(backbone_train_mode, bool):
            raise ValueError(
                f"TTAME.fit: backbone_train_mode must be True or False; got {backbone_train_mode!r}."
            )
        _check_val_data(val_data)
        recipe = self._recipe(recipe)
        weights = {
            "ce_weight": ce_weight,
            "area_weight": area_weight,
            "tv_weight": tv_weight,
            "area_power": area_power,
            "area_eps": area_eps,
            "tv_power": tv_power,
            "tv_border": tv_border,
        }
        _check_loss_options(weights)
        identity = {  # record() without the weights' fingerprint (hashing every weight)
            "method": self._record_method,
            "format": self._format,
            "config": self._config_record(),
            "backbone": self._backbone_record(weights=False),
            "loss": {**weights, "maps": loss_maps},
            "backbone_train_mode": bool(backbone_train_mode),
        }
        step = functools.partial(
            self._step, weights=weights, loss_maps=loss_maps, backbone_train=backbone_train_mode
        )
        validate = None
        if val_data is not None:
            validate = functools.partial(self._validate, val_data, recipe.batch_size)
        with self._fitting():
            return self._train(self.mechanism, step, data, recipe, identity, validate)

    def _step(
        self,
        mechanism: nn.Module,
        batch: Any,
        weights: dict[str, float],
        loss_maps: str,
        backbone_train: bool,
    ) -> dict[str, torch.Tensor]:
        """One T-TAME training step: features, top-1, masked forward pass, loss terms."""
        x = batch_inputs(batch)
        self.adapter.check_inputs(x, "TTAME.fit")
        model = self.adapter.model
        with self._model_state(grad=True), frozen_parameters(model):
            if backbone_train:
                model.train()
            with torch.no_grad():
                feats, logits = self._capture(x)
            y = logits.argmax(1)
            a = torch.sigmoid(mechanism(feats))
            a_y = a[torch.arange(a.shape[0], device=a.device), y].unsqueeze(1)
            mask = F.interpolate(a_y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            masked_logits = self.adapter.forward(x * mask)
        maps = a_y if loss_maps == "target" else a[:, y]
        return ttame_loss(masked_logits, y, maps, **weights)

    def _validate(self, val_data: Any, batch_size: int, mechanism: nn.Module) -> dict[str, float]:
        from torch.utils.data import DataLoader, Dataset, TensorDataset

        from captum_ext.metrics import average_drop_ttame

        data = TensorDataset(val_data) if isinstance(val_data, torch.Tensor) else val_data
        loader = data if not isinstance(data, Dataset) else DataLoader(data, batch_size)
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in loader:
            x = batch_inputs(batch).to(next(mechanism.parameters()).device)
            scores = average_drop_ttame(self.adapter.model, x, self)
            for k, v in scores.items():
                parts.setdefault(k, []).append(v)  # on the device; one host copy at the end
        return {f"val_{k}": float(torch.cat(v).nanmean()) for k, v in parts.items()}

    # ------------------------------------------------------------------ checkpoints
    def _config_record(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "num_classes": self.num_classes,
            "vit_features": self.vit_features,
            "input_size": list(self.input_size),
            "max_size": self.max_size,
        }

    def _backbone_record(self, weights: bool = True) -> dict[str, Any]:
        """The model's class, layout fingerprint and feature shapes and, with ``weights``,
        ``weights_sha256``, the fingerprint of its weights (:meth:`load` refuses others)."""
        model = self.adapter.model
        record = {
            "class": type(model).__name__,
            "fingerprint": model_fingerprint(model, values=False),
            "feature_shapes": [list(s) for s in self.feature_shapes],
        }
        if weights:
            record["weights_sha256"] = model_fingerprint(model)
        return record

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.mechanism.state_dict().items()}

    @classmethod
    def _restore(cls, where, tensors, record, model, **expected) -> TTAME:
        """Checks the backbone (class, layout, feature shapes, classes), loads the mechanism.

        Checkpoint record: the config (layers, ``K``, ViT features, probe size, map size) and
        the backbone's class name, sha256 fingerprint of its state-dict names and shapes,
        feature shapes and the fingerprint of its weights (checked by the base class's
        ``load``); a model that differs in any is refused.
        """
        if expected:
            raise TypeError(f"TTAME.load takes no options; got {sorted(expected)}.")
        config, backbone = record["config"], record["backbone"]
        remedy = "load it with the model it was trained for, or fit a new TTAME for this one"
        check_backbone_layout(where, backbone, "fingerprint", backbone_model(model), remedy)
        try:
            explainer = cls(
                model,
                layers=config["layers"],
                vit_features=config["vit_features"],
                input_size=config["input_size"],
                max_size=config["max_size"],
            )
        except (ValueError, UnsupportedModelError) as err:
            raise CheckpointError(
                where, f"its layers {config['layers']} do not fit this model ({err})", remedy
            ) from err
        shapes = [list(s) for s in explainer.feature_shapes]
        if shapes != backbone["feature_shapes"]:
            raise CheckpointError(
                where,
                f"made for feature shapes {backbone['feature_shapes']}; this model gives {shapes}",
                remedy,
            )
        if explainer.num_classes != config["num_classes"]:
            raise CheckpointError(
                where,
                f"made for {config['num_classes']} classes; this model has {explainer.num_classes}",
                remedy,
            )
        load_tensors(explainer.mechanism, tensors, where, remedy, "tensors (mechanism)")
        return explainer


# ---------------------------------------------------------------------------------------------
# helpers

_LOSS_RANGES = {
    "ce_weight": (">= 0", lambda v: v >= 0),
    "area_weight": (">= 0", lambda v: v >= 0),
    "tv_weight": (">= 0", lambda v: v >= 0),
    "area_power": ("> 0", lambda v: v > 0),
    "area_eps": (">= 0", lambda v: v >= 0),
    "tv_power": ("> 0", lambda v: v > 0),
    "tv_border": (">= 0", lambda v: v >= 0),
}


def _check_loss_options(weights: dict[str, Any]) -> None:
    """Refuses a loss option that is not a finite number in its range, or an all-zero loss."""
    for name, value in weights.items():
        rule, ok = _LOSS_RANGES[name]
        if not (_finite_number(value) and ok(value)):
            raise ValueError(f"TTAME.fit: {name} must be a finite number {rule}; got {value!r}.")
    if not (weights["ce_weight"] or weights["area_weight"] or weights["tv_weight"]):
        raise ValueError(
            "TTAME.fit: ce_weight, area_weight and tv_weight are all 0, so nothing would be "
            "learnt; give at least one a positive weight."
        )


def _check_val_data(val_data: Any) -> None:
    """Refuses ``val_data`` that is not images: a tensor, a Dataset, a DataLoader or another
    iterable of batches (a folder name, say)."""
    path = isinstance(val_data, str | bytes | os.PathLike)
    if val_data is None or (
        not path and any(hasattr(val_data, m) for m in ("__iter__", "__getitem__"))
    ):
        return
    what = f" ({val_data!r})" if path else ""
    raise TypeError(
        "TTAME.fit: val_data must be images (a tensor (B, C, H, W)), a Dataset or a DataLoader "
        f"of them; got {type(val_data).__name__}{what}."
    )


def _check_layers(layers: Sequence[Any]) -> list[Layer]:
    if isinstance(layers, str | int):
        raise ValueError(
            f"TTAME: layers must be a list (e.g. ['layer2', 'layer3', 'layer4']); got {layers!r}."
        )
    out = list(layers)
    if not out:
        raise ValueError("TTAME: layers is empty; pass at least one feature layer.")
    for layer in out:
        if isinstance(layer, bool) or not isinstance(layer, str | int):
            raise ValueError(
                "TTAME: layers are module names (str) or, for transformers, block indices "
                f"(int); got {layer!r}."
            )
    return out


def _check_vit_features(adapter: ModelAdapter, vit_features: str | None) -> ViTFeatures:
    tokens = isinstance(adapter, TransformerAdapter)
    if vit_features is None:
        return "cls" if tokens and adapter.num_prefix_tokens > 0 else "plain"
    if vit_features not in ("plain", "cls"):
        raise ValueError(f"TTAME: vit_features must be 'plain' or 'cls'; got {vit_features!r}.")
    if vit_features == "cls" and not (tokens and adapter.num_prefix_tokens > 0):
        raise ValueError(
            f"TTAME: vit_features='cls' needs a transformer with a CLS token; this "
            f"{adapter.family} has none. Use vit_features='plain'."
        )
    return vit_features  # type: ignore[return-value]


def _input_size(model: nn.Module, size: int | Sequence[int] | None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the probe input."""
    if size is None:
        cfg = getattr(model, "config", None)
        image_size = getattr(cfg, "image_size", None)
        if image_size is not None:
            channels = getattr(cfg, "num_channels", 3)
            hw = image_size if isinstance(image_size, list | tuple) else (image_size,) * 2
            return int(channels), int(hw[0]), int(hw[1])
        pretrained = getattr(model, "pretrained_cfg", None)
        if isinstance(pretrained, dict) and len(pretrained.get("input_size") or ()) == 3:
            return tuple(int(v) for v in pretrained["input_size"])  # type: ignore[return-value]
        return 3, 224, 224
    dims = (size,) if isinstance(size, int) else tuple(size)
    if len(dims) == 1:
        dims = (3, dims[0], dims[0])
    elif len(dims) == 2:
        dims = (3, *dims)
    if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"TTAME: input_size must be H, (H, W) or (C, H, W); got {size!r}.")
    return dims  # type: ignore[return-value]


def _format(maps: torch.Tensor, x: torch.Tensor, output: str) -> torch.Tensor:
    """``(B, 1, s, s)`` maps in the ``output`` layout of ``x``, bilinear as the authors' code."""
    if output != "grid":
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if output == "like_input":
            maps = maps.expand(-1, x.shape[1], -1, -1)
    return maps.to(x.dtype)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation of ``(B, 1, h, w)`` to ``[0, 1]``; constant maps -> 0."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp(min=torch.finfo(maps.dtype).tiny), 0.0)


zoo.register_explainer("ttame", TTAME.load)
