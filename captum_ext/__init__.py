"""captum_ext: class-discriminative explanations for Captum, of transformers and CNNs.

Methods (Captum ``Attribution`` subclasses): :class:`CDAM` and :class:`ConceptCDAM`,
:class:`TokenAblation` (TAM), :class:`RelevancePropagation`, :class:`AttentionRollout` and
:class:`AttentionMap` on timm ViTs, HuggingFace ViT and BERT-family models, and the trainable
:class:`TTAME` and :class:`MHEX`, which also explain CNNs (ResNet, VGG, EfficientNet, ...);
:func:`adapter_for` recognises the model family.

Rooms, bottom to top: ``errors``/``_scores`` (floor 1), ``adapters``, ``checkpoint``, ``data``,
``viz``; ``capture`` (hooks), ``metrics`` and ``zoo``; ``attr`` and ``explainers`` (trainable
explainers); ``registry``; ``evaluation`` and ``models``; ``cli``. Nothing imports from a room
above it.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below are imported on first use (see __getattr__)
    from captum_ext.adapters import ModelAdapter, TransformerAdapter, adapter_for
    from captum_ext.attr import (
        CDAM,
        TAM,
        AttentionMap,
        AttentionRollout,
        ConceptCDAM,
        RelevancePropagation,
        TokenAblation,
    )
    from captum_ext.errors import (
        CheckpointError,
        MissingAttentionError,
        NotFittedError,
        ReentrantCallError,
        UnsupportedModelError,
    )
    from captum_ext.explainers import MHEX, TTAME, TrainingRecipe

__version__ = "0.1.0"

__all__ = [
    "CDAM",
    "MHEX",
    "TAM",
    "TTAME",
    "AttentionMap",
    "AttentionRollout",
    "CheckpointError",
    "ConceptCDAM",
    "MissingAttentionError",
    "ModelAdapter",
    "NotFittedError",
    "ReentrantCallError",
    "RelevancePropagation",
    "TokenAblation",
    "TrainingRecipe",
    "TransformerAdapter",
    "UnsupportedModelError",
    "__version__",
    "adapter_for",
]

_HOMES = {
    **dict.fromkeys(("ModelAdapter", "TransformerAdapter", "adapter_for"), "adapters"),
    **dict.fromkeys(("CDAM", "TAM", "AttentionMap", "AttentionRollout", "ConceptCDAM"), "attr"),
    **dict.fromkeys(("RelevancePropagation", "TokenAblation"), "attr"),
    **dict.fromkeys(
        (
            "CheckpointError",
            "MissingAttentionError",
            "NotFittedError",
            "ReentrantCallError",
            "UnsupportedModelError",
        ),
        "errors",
    ),
    **dict.fromkeys(("MHEX", "TTAME", "TrainingRecipe"), "explainers"),
}
# Where each top-level name lives: imported on first access, so that `import captum_ext`
# (and the command's help) does not pay for torch, timm and Captum.


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'captum_ext' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"captum_ext.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
