"""Adapter for HuggingFace BERT-family text encoders (BERT, RoBERTa, DistilBERT)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from captum_ext.adapters._hf import eager_attention, find_layer_list, find_module
from captum_ext.adapters.base import ModelAdapter, Point, register_adapter

__all__ = ["HFTextAdapter"]


def _is_text_layer(m: nn.Module) -> bool:
    return hasattr(m, "attention") and (hasattr(m, "intermediate") or hasattr(m, "ffn"))


def _is_text_embeddings(m: nn.Module) -> bool:
    return hasattr(m, "word_embeddings") and hasattr(m, "position_embeddings")


@register_adapter
class HFTextAdapter(ModelAdapter):
    """HuggingFace BERT, RoBERTa and DistilBERT encoders, bare or with a head, or wrapped.

    Inputs are ``input_ids (B, T)``; the attention mask goes through
    ``additional_forward_args=(attention_mask,)`` and the model is called as
    ``model(input_ids, attention_mask)``. These encoders are post-LN: no norm
    sits between the residual stream and the self-attention, so the CDAM point
    is the hidden state entering the last layer — the input of its
    self-attention — and the gradient there includes the layer's residual path.
    All positions are kept (special tokens included, no prefix removal); the
    readout is the first token ([CLS] / <s>) unless overridden (e.g.
    ``readout="mean"`` for a mean-pooling sentence encoder).
    """

    family = "HuggingFace BERT-family text encoder (BERT, RoBERTa, DistilBERT)"
    modality = "text"

    def __init__(self, model: nn.Module, readout=None) -> None:
        super().__init__(model, readout)
        self._layers = find_layer_list(self.model, _is_text_layer)
        self._embeddings = find_module(self.model, _is_text_embeddings)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            find_module(model, _is_text_embeddings) is not None
            and find_layer_list(model, _is_text_layer) is not None
        )

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self._layers)

    @property
    def num_heads(self) -> int:
        attn = self._layers[-1].attention
        inner = getattr(attn, "self", attn)
        for name in ("num_attention_heads", "n_heads", "num_heads"):
            if hasattr(inner, name):
                return int(getattr(inner, name))
        cfg = inner.config
        return int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_heads", 0)))

    @property
    def embeddings(self) -> nn.Module:
        return self._embeddings

    def pre_attention_point(self, block: int = -1) -> Point:
        return Point(self._layers[block], "input", None, f"layer[{block}] input")

    def attention_point(self, block: int) -> Point:
        return Point(self._layers[block].attention, "output", 1, f"layer[{block}].attention")

    def token_point(self) -> Point:
        return Point(self._embeddings, "output", None, "embeddings output")

    @contextlib.contextmanager
    def attention_probabilities(self) -> Iterator[None]:
        with eager_attention(self.model):
            yield
