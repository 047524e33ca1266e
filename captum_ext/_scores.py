"""Floor 1: model outputs to scores, Captum targets to class indices, progress bars.

The one home of what every room above needs: reading a ``(B, C)`` score tensor
out of whatever a model returns (:func:`model_output_to_tensor`), turning
Captum's ``TargetType`` forms into class indices (:func:`normalise_target`,
:func:`target_indices`), picking the score of each example's class
(:func:`select_target`) and wrapping long loops in a tqdm bar
(:func:`progress`). Nothing here knows a model family or a method.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch

__all__ = [
    "model_output_to_tensor",
    "normalise_target",
    "progress",
    "select_target",
    "target_indices",
]

_T = TypeVar("_T")


def model_output_to_tensor(out: Any) -> torch.Tensor:
    """Turns what a model's forward returns into one score tensor ``(B, C)``.

    A tensor is returned as it is; HuggingFace ``ModelOutput``s and mappings
    give ``logits`` when present, else ``pooler_output`` (an encoder's
    latent, as ``ConceptCDAM`` explains), else the first token of
    ``last_hidden_state``; tuples and lists give their first element.

    Raises:
        TypeError: Nothing in ``out`` is a score tensor.
    """
    if isinstance(out, torch.Tensor):
        return out
    get = out.get if isinstance(out, Mapping) else lambda k: getattr(out, k, None)
    for key in ("logits", "pooler_output"):
        value = get(key)
        if isinstance(value, torch.Tensor):
            return value
    hidden = get("last_hidden_state")
    if isinstance(hidden, torch.Tensor):
        return hidden[:, 0]
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"Cannot read scores from a model output of type {type(out).__name__}; expected a "
        "tensor, a HuggingFace ModelOutput with logits/pooler_output, or a tuple of tensors."
    )


def target_indices(
    target: Any,
    batch_size: int,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    method: str = "captum_ext",
) -> torch.Tensor:
    """Turns an explicit Captum ``target`` into a long tensor ``(B,)``.

    Valid forms: an int, a scalar tensor, a list/tuple of B ints, or an
    integer tensor of shape ``(B,)`` or ``(B, 1)``. Anything else — a
    ``(2, 2)`` tensor for a batch of 4, floats, bools, a meta tensor — is
    refused rather than reshaped.

    Args:
        target: The target (not ``None``; see :func:`normalise_target`).
        batch_size: B.
        num_classes: When given, every index must lie in ``0 .. C-1``.
        device: Device of the result (default: the target's, else CPU).
        method: Name used in error messages.

    Raises:
        ValueError: Unsupported form, wrong shape or length, or out of range.
    """
    values: list[int] | None = None  # Python targets are checked without a device sync
    if isinstance(target, int) and not isinstance(target, bool):
        values = [target]
        idx = torch.full((batch_size,), target, dtype=torch.long, device=device)
    elif isinstance(target, torch.Tensor):
        idx = _tensor_target(target, batch_size, method)
    elif isinstance(target, list | tuple) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in target
    ):
        values = list(target)
        idx = torch.tensor(values, dtype=torch.long, device=device)
    else:
        raise ValueError(f"{method}: unsupported target {target!r}. {_SUPPORTED_TARGETS}")
    if idx.numel() != batch_size:
        raise ValueError(
            f"{method}: got {idx.numel()} targets for a batch of {batch_size} (expected shape "
            f"({batch_size},)); pass one int for all examples or one per example."
        )
    if num_classes is not None:
        _check_target_range(idx, values, num_classes, method)
    return idx.to(device) if device is not None else idx


_SUPPORTED_TARGETS = (
    "Supported: None (predicted class), an int, a list of B ints or an integer tensor of "
    "shape (B,) or (B, 1)."
)


def _tensor_target(target: torch.Tensor, batch_size: int, method: str) -> torch.Tensor:
    """A tensor ``target`` (scalar, ``(B,)`` or ``(B, 1)`` integers) as a long ``(B,)``."""
    if target.is_meta:
        raise ValueError(f"{method}: target is a meta tensor without values. {_SUPPORTED_TARGETS}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"{method}: target must hold integer class indices; got {target.dtype}.")
    t = target.detach()
    if t.dim() == 0 or (t.numel() == 1 and t.dim() == 1 and batch_size != 1):
        return t.reshape(()).long().expand(batch_size).clone()
    if t.dim() == 1 or (t.dim() == 2 and t.shape[1] == 1):
        return t.reshape(-1).long()
    raise ValueError(
        f"{method}: target has shape {tuple(t.shape)}; for a batch of {batch_size} "
        f"expected ({batch_size},) or ({batch_size}, 1). {_SUPPORTED_TARGETS}"
    )


def _check_target_range(
    idx: torch.Tensor, values: list[int] | None, num_classes: int, method: str
) -> None:
    """Refuses a class index outside ``0 .. num_classes - 1`` (``values``: no device sync)."""
    if values is not None:
        bad_value = next((v for v in values if not 0 <= v < num_classes), None)
    else:
        bad = (idx < 0) | (idx >= num_classes)
        bad_value = idx[bad][0].item() if bad.any() else None
    if bad_value is not None:
        raise ValueError(
            f"{method}: target {bad_value} is out of range for a model with "
            f"{num_classes} outputs (valid: 0..{num_classes - 1})."
        )


def normalise_target(target: Any, scores: torch.Tensor, method: str) -> torch.Tensor:
    """Turns a Captum ``target`` into class indices ``(B,)`` for ``scores (B, C)``.

    Args:
        target: ``None`` (the predicted class, as pytorch-grad-cam does; a model
            with one output uses that output) or any form of
            :func:`target_indices`.
        scores: Model output ``(B, C)`` (``(B,)`` counts as one output).
        method: Method name for error messages.

    Raises:
        ValueError: The output is not ``(B, C)``, or the target is invalid.
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
        if c > 1:
            return scores.argmax(dim=1)
        return torch.zeros(b, dtype=torch.long, device=scores.device)
    return target_indices(target, b, c, scores.device, method)


def select_target(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Scores ``(B,)`` of the classes ``idx (B,)`` in ``scores (B, C)``."""
    if scores.dim() == 1:
        scores = scores[:, None]
    return scores.gather(1, idx.reshape(-1, 1).to(scores.device)).squeeze(1)


def progress(
    iterable: Iterable[_T] | None = None,
    show: bool = True,
    desc: str | None = None,
    total: int | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one when it is ``None``), disabled unless ``show``.

    Always returns a tqdm object, so callers may use ``update`` and the
    context manager whether or not the bar is shown. A shown bar is ``tqdm.auto``'s (a widget
    in Jupyter) when ipywidgets is installed (the ``tutorials`` extra), else the plain text bar
    of ``tqdm.std``, which Jupyter shows as well: ``tqdm.auto`` without ipywidgets would warn
    "IProgress not found" in every notebook; a hidden bar never imports ``tqdm.auto``.
    """
    import importlib.util

    if show and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not show, **kwargs)
