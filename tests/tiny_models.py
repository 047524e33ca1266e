"""Tiny, seeded, randomly initialised models of every adapter family, built in code, offline.

One table (``IMAGE_MODELS``, ``TEXT_MODELS``) drives the cross-cutting tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

NUM_CLASSES = 5
VOCAB = 50


def _timm(**kw) -> nn.Module:
    import timm

    args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=NUM_CLASSES
    )
    args.update(kw)
    name = args.pop("name", "vit_tiny_patch16_224")
    return timm.create_model(name, pretrained=False, **args)


def timm_vit() -> nn.Module:
    return _timm()


def timm_deit_distilled() -> nn.Module:
    return _timm(name="deit_tiny_distilled_patch16_224")


def timm_registers() -> nn.Module:
    return _timm(reg_tokens=4)


def timm_avgpool() -> nn.Module:
    return _timm(class_token=False, global_pool="avg")


def timm_nonsquare() -> nn.Module:
    return _timm(img_size=(32, 48))


def timm_dynamic() -> nn.Module:
    return _timm(dynamic_img_size=True)


def hf_vit_classifier() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_CLASSES,
    )
    return ViTForImageClassification(cfg)


class HFViTEmbedder(nn.Module):
    """A bare ``ViTModel`` returning the final CLS token (B, D)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        self.vit = ViTModel(cfg, add_pooling_layer=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values).last_hidden_state[:, 0]


def _bert_cfg(cls, **kw):
    args = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    args.update(kw)
    return cls(**args)


def bert_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(_bert_cfg(BertConfig, num_labels=NUM_CLASSES))


def roberta_classifier() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        _bert_cfg(RobertaConfig, num_labels=NUM_CLASSES, pad_token_id=1)
    )


def distilbert_classifier() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=64,
        num_labels=NUM_CLASSES,
    )
    return DistilBertForSequenceClassification(cfg)


class MeanPoolBert(nn.Module):
    """A user's sentence encoder: mean pooling over a bare ``BertModel``, then a linear head."""

    def __init__(self, num_classes: int | None = NUM_CLASSES) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.encoder = BertModel(_bert_cfg(BertConfig), add_pooling_layer=False)
        self.head = nn.Linear(32, num_classes) if num_classes else nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    modality: str
    image_size: tuple[int, int] = (32, 32)


IMAGE_MODELS = [
    Case("timm_vit", timm_vit, "image"),
    Case("timm_deit_distilled", timm_deit_distilled, "image"),
    Case("timm_registers", timm_registers, "image"),
    Case("timm_avgpool", timm_avgpool, "image"),
    Case("timm_nonsquare", timm_nonsquare, "image", (32, 48)),
    Case("timm_dynamic", timm_dynamic, "image", (40, 24)),
    Case("hf_vit", hf_vit_classifier, "image"),
]
TEXT_MODELS = [
    Case("bert", bert_classifier, "text"),
    Case("roberta", roberta_classifier, "text"),
    Case("distilbert", distilbert_classifier, "text"),
    Case("meanpool_bert", MeanPoolBert, "text"),
]
ALL_MODELS = IMAGE_MODELS + TEXT_MODELS


def build(case: Case, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """The case's model, seeded, in eval mode, in ``dtype``."""
    torch.manual_seed(seed)
    return case.build().to(dtype).eval()


def make_inputs(
    case: Case, batch: int = 3, dtype: torch.dtype = torch.float64, seed: int = 1
) -> tuple[torch.Tensor, tuple]:
    """Inputs and ``additional_forward_args`` for the case (text: ragged attention masks)."""
    g = torch.Generator().manual_seed(seed)
    if case.modality == "image":
        return torch.randn(batch, 3, *case.image_size, generator=g, dtype=dtype), ()
    t = 9
    ids = torch.randint(5, VOCAB, (batch, t), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(batch, t, dtype=torch.long)
    for b in range(batch):
        length = t - (b % 3)
        ids[b, length - 1] = 3
        ids[b, length:] = 0
        mask[b, length:] = 0
    return ids, (mask,)
