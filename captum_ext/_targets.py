"""Target selection: Captum's ``TargetType`` forms, validated with clear errors."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["normalise_target", "select_target"]


def normalise_target(target: Any, scores: torch.Tensor, method: str) -> torch.Tensor:
    """Turns a Captum ``target`` into a long tensor ``(B,)`` of class indices.

    Args:
        target: ``None`` (the predicted class, as pytorch-grad-cam does; a model
            with one output uses that output), an int, a scalar tensor, a list
            of ints or a tensor ``(B,)`` with one class per example.
        scores: Model output ``(B, C)``.
        method: Method name for error messages.

    Raises:
        ValueError: The target is out of range or its length is not the batch size.
    """
    if scores.dim() == 1:
        scores = scores[:, None]
    if scores.dim() != 2:
        raise ValueError(
            f"{method}: the model output has shape {tuple(scores.shape)}; expected (B, C) "
            "scores. Wrap the model so that it returns one score vector per example."
        )
    b, c = scores.shape
    if target is None:
        idx = scores.argmax(dim=1) if c > 1 else torch.zeros(b, dtype=torch.long)
    elif isinstance(target, int) and not isinstance(target, bool):
        idx = torch.full((b,), target, dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point():
            raise ValueError(
                f"{method}: target must hold integer class indices; got {target.dtype}."
            )
        idx = target.reshape(-1).long().cpu()
        if idx.numel() == 1:
            idx = idx.expand(b).clone()
    elif isinstance(target, list | tuple) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in target
    ):
        idx = torch.tensor(target, dtype=torch.long)
    else:
        raise ValueError(
            f"{method}: unsupported target {target!r}. Supported: None (predicted class), an "
            "int, a list of ints or a tensor (B,) of class indices."
        )
    if idx.numel() != b:
        raise ValueError(
            f"{method}: got {idx.numel()} targets for a batch of {b}; pass one int for all "
            "examples or one per example."
        )
    if ((idx < 0) | (idx >= c)).any():
        bad = idx[(idx < 0) | (idx >= c)][0].item()
        raise ValueError(
            f"{method}: target {bad} is out of range for a model with {c} outputs "
            f"(valid: 0..{c - 1})."
        )
    return idx.to(scores.device)


def select_target(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Scores ``(B,)`` of the classes ``idx (B,)`` in ``scores (B, C)``."""
    if scores.dim() == 1:
        scores = scores[:, None]
    return scores.gather(1, idx[:, None]).squeeze(1)
