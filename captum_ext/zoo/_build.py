"""Rebuild zoo architectures from their JSON records and read the shipped files.

A record (``weights/<name>.json``) names a ``library`` and an ``arch`` with JSON-only keyword
arguments (``model_kwargs``); the architecture is rebuilt from those alone (the weights are
read and verified by :mod:`captum_ext.checkpoint`, no pickle anywhere):

* ``library="timm"``: ``timm.create_model(arch, pretrained=False, **model_kwargs)``; JSON lists
  are turned back into tuples (e.g. ResNet ``channels``). Besides timm's own architectures this
  module registers two small ones in timm's registry (on import of ``captum_ext.zoo``):
  ``zoo_vit_convstem``, a timm ``VisionTransformer`` whose patch embedding is a convolutional
  stem (Xiao et al., 2021, "Early Convolutions Help Transformers See Better",
  arXiv:2106.14881), and ``zoo_resnet_s1``, a timm ``ResNet`` with a stride-1 deep stem and no
  max-pool for 32 x 32 images (CIFAR-style).
* ``library="transformers"``: ``arch`` is ``"BertForSequenceClassification"``, built from
  ``BertConfig(**model_kwargs)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from captum_ext.zoo._records import WEIGHTS_DIR, record_names

__all__ = [
    "WEIGHTS_DIR",
    "ConvStemPatchEmbed",
    "build_model",
    "record_names",
    "zoo_resnet_s1",
    "zoo_vit_convstem",
]


_TIMM_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose projection is a convolutional stem.

    Blocks of 3x3 convolution (stride 1 or 2), BatchNorm and ReLU, then a 1x1 convolution to
    ``embed_dim`` (Xiao et al., 2021, arXiv:2106.14881). The product of the strides equals
    ``patch_size``, so ``patch_size``, ``grid_size`` and ``num_patches`` mean what they mean
    for a patchifying ``PatchEmbed`` and the output is ``(B, N, D)`` as usual. Unlike a
    patchifying projection, a token's receptive field reaches beyond its own patch.

    Args:
        img_size: Input image size.
        patch_size: Total stride of the stem.
        in_chans: Input channels.
        embed_dim: Token width ``D``.
        stem_chs: Output channels of the conv blocks, one per block.
        stem_strides: Stride of each conv block (1 or 2); default 2 for every block.
        **kwargs: Passed to ``PatchEmbed`` (``bias``, ``dynamic_img_pad``, ...).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 64,
        stem_chs: tuple[int, ...] = (16, 32, 64),
        stem_strides: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            **kwargs,
        )
        strides = tuple(stem_strides) if stem_strides is not None else (2,) * len(stem_chs)
        if len(strides) != len(stem_chs) or math.prod(strides) != patch_size:
            raise ValueError(
                "a convolutional stem needs one stride per block and strides whose product is "
                f"patch_size; got patch_size={patch_size}, stem_chs={tuple(stem_chs)}, "
                f"stem_strides={strides}"
            )
        layers: list[nn.Module] = []
        c = in_chans
        for out, stride in zip(stem_chs, strides, strict=True):
            layers += [
                nn.Conv2d(c, out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            c = out
        layers.append(nn.Conv2d(c, embed_dim, 1, bias=kwargs.get("bias", True)))
        self.proj = nn.Sequential(*layers)


def _drop_factory_keys(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _TIMM_FACTORY_KEYS}


def _small_cfg(model: nn.Module, img_size: int | tuple[int, int], num_classes: int) -> None:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    model.pretrained_cfg = {
        "input_size": (3, *size),
        "num_classes": num_classes,
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "fixed_input_size": True,
    }


@register_model
def zoo_vit_convstem(
    pretrained: bool = False,
    stem_chs: tuple[int, ...] = (16, 32, 64),
    stem_strides: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """timm ``VisionTransformer`` with a :class:`ConvStemPatchEmbed` patch embedding.

    Args:
        pretrained: Must be False (nothing is downloadable).
        stem_chs: Channels of the stem's conv blocks.
        stem_strides: Strides of the stem's conv blocks (product = ``patch_size``); default 2
            for every block.
        **kwargs: ``VisionTransformer`` arguments (``img_size``, ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ``num_classes``, ...).

    Returns:
        The randomly initialised model.
    """
    if pretrained:
        raise ValueError("zoo_vit_convstem has no pretrained weights; use captum_ext.zoo.load")
    kwargs = _drop_factory_keys(kwargs)
    embed = functools.partial(
        ConvStemPatchEmbed,
        stem_chs=tuple(stem_chs),
        stem_strides=None if stem_strides is None else tuple(stem_strides),
    )
    model = VisionTransformer(embed_layer=embed, **kwargs)
    _small_cfg(model, kwargs.get("img_size", 224), model.num_classes)
    return model


@register_model
def zoo_resnet_s1(
    pretrained: bool = False,
    layers: tuple[int, ...] = (1, 1, 1, 1),
    channels: tuple[int, ...] = (16, 32, 64, 128),
    **kwargs: Any,
) -> ResNet:
    """timm ``ResNet`` (BasicBlock) with a stride-1 deep stem and no max-pool.

    The stem is timm's ``stem_type="deep"`` (three 3x3 convolutions, widths
    ``channels[0] // 2, channels[0] // 2, channels[0]``) with the first convolution's stride
    set to 1, and the stem max-pool is removed; for 32 x 32 images the stages run at 32, 16, 8
    and 4 pixels instead of 8, 4, 2 and 1 (as in CIFAR ResNets).

    Args:
        pretrained: Must be False (nothing is downloadable).
        layers: BasicBlocks per stage.
        channels: Channels per stage.
        **kwargs: Other ``ResNet`` arguments (``num_classes``, ``in_chans``, ...).

    Returns:
        The randomly initialised model.
    """
    if pretrained:
        raise ValueError("zoo_resnet_s1 has no pretrained weights; use captum_ext.zoo.load")
    kwargs = _drop_factory_keys(kwargs)
    model = ResNet(
        block=BasicBlock,
        layers=tuple(layers),
        channels=tuple(channels),
        stem_type="deep",
        stem_width=channels[0] // 2,
        **kwargs,
    )
    model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()
    _small_cfg(model, 32, model.num_classes)
    return model


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples, recursively (timm signatures use tuples)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def build_model(record: dict[str, Any]) -> nn.Module:
    """Build the randomly initialised architecture described by a record.

    Args:
        record: A zoo record with ``library``, ``arch`` and ``model_kwargs``.

    Returns:
        The model in float32 (train mode, untrained weights).

    Raises:
        ValueError: If the library or architecture is not one the zoo knows how to build.
    """
    library, arch = record["library"], record["arch"]
    kwargs = record.get("model_kwargs", {})
    if library == "timm":
        import timm

        return timm.create_model(arch, pretrained=False, **_tuples(kwargs)).float()
    if library == "transformers" and arch == "BertForSequenceClassification":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(**kwargs)).float()
    raise ValueError(
        f"cannot build library={library!r}, arch={arch!r}; the zoo builds timm models and "
        "transformers BertForSequenceClassification"
    )
