"""One text model's held-out set as the metrics read it, and how its maps are produced."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from captum_ext.data.text import SPECIAL_TOKENS

from ._baselines import random_map
from ._config import EvalConfig
from ._maps import MapFn, chunks
from ._table import TEXT_TABLE, MapContext

__all__ = ["TextSet"]


class TextSet:
    """The sequences of a ``TextBatch``, each explained for its label.

    Attributes read by the metric table: ``model`` (called as ``model(input_ids,
    attention_mask)``), ``inputs`` (token ids ``(N, T)``), ``targets`` (labels ``(N,)``),
    ``attention_mask``, ``special`` (special tokens), ``valid`` (attended, non-special tokens),
    ``rationale`` (planted rationale) and ``groups`` (the sequence of each value).
    """

    modality = "text"
    table = TEXT_TABLE
    baseline_notes = ("centre-Gaussian baseline not defined for text; omitted.",)

    def __init__(self, model: nn.Module, data: Any, config: EvalConfig) -> None:
        device = config.device
        self.model = model
        self.inputs = data.input_ids.to(device)
        self.attention_mask = data.attention_mask.to(device)
        self.targets = data.labels.to(device)
        vocab = list(getattr(data, "vocab", []))
        special = [vocab.index(t) for t in SPECIAL_TOKENS if t in vocab]
        ids = self.inputs
        self.special = torch.isin(ids, torch.tensor(special, dtype=ids.dtype, device=ids.device))
        self.valid = self.attention_mask.bool() & ~self.special
        self.rationale = data.rationale.to(device)
        self.groups = torch.arange(len(ids))
        self.seed, self.batch_size = config.seed, config.batch_size

    def method_map(self, attr: Any, class_agnostic: bool) -> Callable[[], Tensor]:
        """The token maps of an attribution object for every sequence's label."""

        def run() -> Tensor:
            ids, mask, target = self.inputs, self.attention_mask, self.targets
            return torch.cat(
                [
                    attr.attribute(ids[s], target=target[s], additional_forward_args=(mask[s],))
                    for s in chunks(len(ids), self.batch_size)
                ]
            ).detach()

        return run

    def baselines(self) -> Mapping[str, Callable[[], Tensor]]:
        """The random baseline (the centre-Gaussian one has no meaning for tokens)."""
        return {"random": lambda: random_map(self.inputs, self.seed)}

    def extra_map(self, name: str, fn: MapFn) -> Callable[[], Tensor]:
        """A custom map, called once on all sequences."""
        return lambda: fn(self.inputs, self.targets).detach()

    def context(self, name: str, raw: Tensor, references: Mapping[str, Tensor]) -> MapContext:
        """The context of one token map ``(N, T)``."""
        s = raw.float()
        if s.shape != self.inputs.shape:
            raise ValueError(
                f"map {name!r}: expected {tuple(self.inputs.shape)}, got {tuple(s.shape)}"
            )
        return MapContext(name, s, s, self, references)

    def meta(self, methods: list[str]) -> dict[str, Any]:
        """Settings and sizes of this set (``summary_parts`` become the table's summary)."""
        return {
            "modality": "text",
            "n_images": len(self.inputs),
            "methods": methods,
            "summary_parts": [
                f"{len(self.inputs)} sequences, target = label",
                "ERASER AOPC over 1/5/10/20/50 % of the non-special tokens; AUPRC vs. the "
                "planted rationale",
            ],
        }
