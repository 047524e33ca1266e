"""What every method in :mod:`captum_ext.attr` shares: inputs in, token maps out."""

from __future__ import annotations

from typing import Any, Literal

import torch
from captum.attr import LayerAttribution

from captum_ext.adapters.base import ModelAdapter

__all__ = ["OutputKind", "format_token_map", "pack_output", "unpack_inputs"]

OutputKind = Literal["input", "grid", "tokens"]
_OUTPUTS = ("input", "grid", "tokens")


def unpack_inputs(inputs: Any, method: str) -> tuple[torch.Tensor, bool]:
    """Accepts a tensor or a 1-tuple (Captum's metrics pass tuples); returns (tensor, was_tuple)."""
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise ValueError(
                f"{method}: expected one input tensor (images or input_ids); got a tuple of "
                f"{len(inputs)}. Pass extra model arguments through additional_forward_args."
            )
        return inputs[0], True
    return inputs, False


def pack_output(attr: torch.Tensor, was_tuple: bool) -> torch.Tensor | tuple[torch.Tensor]:
    return (attr,) if was_tuple else attr


def format_token_map(
    scores: torch.Tensor,
    adapter: ModelAdapter,
    inputs: torch.Tensor,
    output: OutputKind,
    method: str,
) -> torch.Tensor:
    """Turns per-token scores into the requested output.

    Args:
        scores: ``(B, N)`` or ``(B, K, N)`` scores over all tokens incl. prefix
            (``K`` e.g. heads).
        adapter: The model's adapter.
        inputs: The images ``(B, C, H, W)`` or ``input_ids (B, T)``.
        output: ``"input"``: images ``(B, 1|K, H, W)`` (nearest upsampling of
            the patch grid, cropped when the model pads), text ``(B, T)``;
            ``"grid"``: ``(B, 1|K, h, w)``; ``"tokens"``: ``(B, [K,] P)``
            patch tokens in row-major order, prefix removed.
        method: Method name for error messages.
    """
    if output not in _OUTPUTS:
        raise ValueError(f"{method}: output must be one of {_OUTPUTS}; got {output!r}.")
    squeeze = scores.dim() == 2
    if squeeze:
        scores = scores[:, None]
    if adapter.modality == "text":
        if output == "grid":
            raise ValueError(f"{method}: output='grid' is for images; text maps are (B, T).")
        return scores[:, 0] if squeeze else scores
    p = adapter.num_prefix_tokens
    tokens = scores[..., p:]
    if output == "tokens":
        return tokens[:, 0] if squeeze else tokens
    h, w = adapter.grid_size(inputs)
    if tokens.shape[-1] != h * w:
        raise ValueError(
            f"{method}: the layer holds {tokens.shape[-1]} patch tokens but the input has a "
            f"{h}x{w} patch grid; pass the module whose output are the tokens of the last block."
        )
    grid = tokens.reshape(*tokens.shape[:2], h, w)
    if output == "grid":
        return grid
    ph, pw = adapter.patch_size
    up = LayerAttribution.interpolate(grid, (h * ph, w * pw), interpolate_mode="nearest")
    return up[..., : inputs.shape[-2], : inputs.shape[-1]]
