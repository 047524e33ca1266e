"""Adapter for convolutional networks: timm and torchvision ResNet, VGG, EfficientNet, ConvNeXt.

A CNN has no tokens, heads or attention; what captum_ext needs from it is the forward call and
*feature points*: a named module whose output is a map ``(B, C, h, w)`` (the branches of the
trainable explainers). The transformer methods (CDAM, TAM, relevance propagation, rollout,
attention map) refuse CNNs by kind (:func:`~captum_ext.adapters.adapter_for` with
``kind=TransformerAdapter``), naming the family.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from captum_ext.adapters.base import ModelAdapter, Readout, register_adapter

__all__ = ["CNNAdapter"]

_STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _has_attention(model: nn.Module) -> bool:
    """Whether any submodule is a self-attention (heads) or a HuggingFace model (``config``)."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            return True
        attrs = vars(m)
        if isinstance(attrs.get("num_heads"), int) or isinstance(
            attrs.get("num_attention_heads"), int
        ):
            return True
        if hasattr(m, "config") and hasattr(m, "base_model_prefix"):  # HF PreTrainedModel
            return True
    return False


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _is_resnet(model: nn.Module) -> bool:
    """torchvision / timm ResNet layout: ``layer1`` .. ``layer4`` stages and an ``fc`` head."""
    return all(isinstance(getattr(model, f"layer{i}", None), nn.Module) for i in range(1, 5)) and (
        isinstance(getattr(model, "fc", None), nn.Module)
    )


def _feature_info_modules(model: nn.Module) -> list[str] | None:
    """Module names of a timm model's ``feature_info`` (a list of dicts), when all resolve."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info:
        return None
    if not all(isinstance(d, dict) and isinstance(d.get("module"), str) for d in info):
        return None
    names = [d["module"] for d in info]
    modules = dict(model.named_modules())
    return names if all(n in modules and n for n in names) else None


def _features_stack(model: nn.Module) -> nn.Sequential | None:
    """torchvision layout: a ``features`` Sequential holding convolutions, and a ``classifier``."""
    features = getattr(model, "features", None)
    if (
        isinstance(features, nn.Sequential)
        and isinstance(getattr(model, "classifier", None), nn.Module)
        and _has_conv(features)
    ):
        return features
    return None


def _is_cnn(model: nn.Module) -> bool:
    """One of the recognised layouts (attention and HF models are excluded by the caller)."""
    if _is_resnet(model) or _feature_info_modules(model) is not None:
        return True
    return _features_stack(model) is not None


def _stride(module: nn.Module) -> int:
    """The largest stride of a convolution or pooling inside ``module`` (1 if none)."""
    out = 1
    for m in module.modules():
        if isinstance(m, _STRIDED):
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            out = max(out, int(s or 1))
    return out


def _is_pointwise_head(module: nn.Module) -> bool:
    """A block whose convolutions are all 1x1 (the channel-expanding head of EfficientNet)."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and all(tuple(c.kernel_size) == (1, 1) for c in convs)


def _vgg_pools(features: nn.Sequential) -> list[str]:
    """Indices of the max-pool children of a VGG-style ``features`` stack."""
    return [n for n, m in features.named_children() if isinstance(m, nn.MaxPool2d)]


def _stage_ends(features: nn.Sequential) -> list[str]:
    """The last child at each output stride of a ``features`` stack, shallow to deep.

    The stride of a child is read from its modules (largest stride of a convolution or pooling
    in it: each child of these stacks downsamples at most once). A final all-1x1 head
    (EfficientNet, MobileNet) is left out, so the deepest branch is the last stage, as in
    timm's ``feature_info``.
    """
    children = list(features.named_children())
    if len(children) > 1 and _is_pointwise_head(children[-1][1]):
        children = children[:-1]
    ends: dict[int, str] = {}
    reduction = 1
    for name, child in children:
        reduction *= _stride(child)
        ends[reduction] = name
    return [ends[r] for r in sorted(ends) if r > 1]


@register_adapter
class CNNAdapter(ModelAdapter):
    """Convolutional networks: timm and torchvision ResNet, VGG, EfficientNet, ConvNeXt.

    Recognised by structure (:meth:`matches`), not class name, in this order:

    * ResNet layout (torchvision, timm): ``layer1`` .. ``layer4`` and ``fc``;
    * timm models with ``feature_info`` (a list of dicts naming modules): timm ResNet,
      EfficientNet, ConvNeXt, VGG, RegNet, ...;
    * torchvision ``features`` Sequential with convolutions plus a ``classifier``: VGG,
      EfficientNet, ConvNeXt, MobileNet, DenseNet, AlexNet.

    A model holding any self-attention (a module with ``num_heads``, ``nn.MultiheadAttention``)
    or a HuggingFace ``PreTrainedModel`` is never a CNN, so conv-stem ViTs, Swin and hybrid
    models are not matched here (the transformer adapters are tried first anyway). A user's
    module wrapping exactly one such network (e.g. a normalisation layer followed by a
    torchvision ResNet) is matched too; its layer names carry the wrapper's prefix
    (``"backbone.layer3"``).

    Feature points are module names (``model.named_modules()``), read at the module's output
    ``(B, C, h, w)``. A CNN has no patch grid: its maps are as coarse as the layer they come
    from, so it has no ``grid_size`` (evaluation pools its maps to the benchmark's cells).

    Attributes:
        prefix: Name of the recognised network inside the model (``""`` when it is the model).
    """

    family: ClassVar[str] = (
        "CNN (timm ResNet/EfficientNet/ConvNeXt/VGG, torchvision ResNet/VGG/EfficientNet)"
    )
    kind: ClassVar[str] = "cnn"
    modality = "image"

    def __init__(self, model: nn.Module, readout: Readout | None = None) -> None:
        if readout is not None:
            raise ValueError(
                f"readout={readout!r} applies to transformers; a CNN reads its own pooled "
                "features. Leave readout=None."
            )
        super().__init__(model)
        found = self._backbone(self.model)
        if found is None:
            raise ValueError(f"{type(self.model).__name__} is not a recognised {self.family}.")
        self.prefix, self._net = found

    @classmethod
    def _backbone(cls, model: nn.Module) -> tuple[str, nn.Module] | None:
        """``(name, module)`` of the recognised network: the model itself, or its one CNN."""
        if _is_cnn(model):
            return "", model
        found: list[tuple[str, nn.Module]] = []
        for name, m in model.named_modules():
            if not name or any(name.startswith(f"{outer}.") for outer, _ in found):
                continue
            if _is_cnn(m):
                found.append((name, m))
        return found[0] if len(found) == 1 else None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _has_conv(model) and not _has_attention(model) and cls._backbone(model) is not None

    def default_feature_layers(self) -> list[str | int]:
        """The three preset branches (T-TAME), shallow to deep, as module names.

        * ResNet layout: ``layer2``, ``layer3``, ``layer4`` (strides 8, 16, 32);
        * VGG (a ``features`` stack with max-pool children): the last three pools
          (VGG-16: ``features.16/23/30``, pool3/4/5 as in T-TAME). This comes before
          ``feature_info``, whose VGG entries are the activations before each pool and the
          last pool, so its last two would be one map before and after pooling;
        * timm ``feature_info``: its last three entries (EfficientNet ``blocks.2/4/6``,
          ConvNeXt ``stages.1/2/3``);
        * other ``features`` stacks (torchvision EfficientNet, ConvNeXt, MobileNet): the last
          child at each of the three deepest output strides (EfficientNet-B0
          ``features.3/5/7``, ConvNeXt ``features.3/5/7``).

        Raises:
            ValueError: None of these layouts; pass ``layers=[...]`` with module names.
        """
        net = self._net
        names: list[str] = []
        features = _features_stack(net) or getattr(net, "features", None)
        if _is_resnet(net):
            names = ["layer2", "layer3", "layer4"]
        elif isinstance(features, nn.Sequential) and len(_vgg_pools(features)) >= 3:
            names = [f"features.{n}" for n in _vgg_pools(features)[-3:]]
        elif (info := _feature_info_modules(net)) is not None and len(info) >= 3:
            names = info[-3:]
        elif isinstance(features, nn.Sequential) and len(_stage_ends(features)) >= 3:
            names = [f"features.{n}" for n in _stage_ends(features)[-3:]]
        if not names:
            return super().default_feature_layers()
        return [f"{self.prefix}.{n}" if self.prefix else n for n in names]
