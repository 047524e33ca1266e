"""Adapter for timm ``VisionTransformer`` and its subclasses (DeiT, DINO, registers)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from captum_ext.adapters.base import (
    Point,
    Readout,
    TransformerAdapter,
    as_tuple,
    register_adapter,
)

__all__ = ["TimmViTAdapter"]


@register_adapter
class TimmViTAdapter(TransformerAdapter):
    """timm ``VisionTransformer`` (``vit_*``, ``deit_*`` incl. distilled, DINO, register models).

    Prefix tokens come from ``model.num_prefix_tokens`` (CLS, DIST, registers).
    The readout is the CLS row (``global_pool='token'``), the mean of CLS and
    DIST rows for distilled DeiT, or the mean of the patch rows
    (``global_pool='avg'``; of every row with ``pool_include_prefix=True``).
    ``global_pool='max'``, ``'avgmax'``, ``'map'`` (attention pooling) and
    ``''`` are no weighting of rows: :meth:`readout_refusal` names them, and
    the methods that read the readout rows refuse them.
    Attention probabilities are read at each block's ``attn.attn_drop`` with
    ``fused_attn`` switched off for the call. The model is called as
    ``model(images)``: extra positional arguments (which timm would take as
    ``attn_mask``) are refused.
    """

    family = "timm VisionTransformer"
    modality = "image"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        return (
            hasattr(model, "patch_embed")
            and hasattr(model, "num_prefix_tokens")
            and isinstance(blocks, nn.Sequential | nn.ModuleList)
            and len(blocks) > 0
            and all(hasattr(b, "attn") and hasattr(b, "norm1") for b in blocks)
        )

    @classmethod
    def refusal(cls, model: nn.Module) -> str | None:
        """timm models shaped like a ViT whose token path differs (EVA: rotary embeddings)."""
        name = type(model).__name__
        if getattr(model, "rope", None) is not None:
            return (
                f"{name} uses rotary position embeddings inside its attention (timm EVA/EVA-02); "
                "token removal and attention capture assume a plain timm VisionTransformer, so "
                "it is not supported."
            )
        if not isinstance(getattr(model, "patch_drop", None), nn.Module) or not all(
            isinstance(getattr(b.attn, "attn_drop", None), nn.Module) for b in model.blocks
        ):
            return (
                f"{name} looks like a timm ViT but lacks the patch_drop / attn.attn_drop modules "
                "where captum_ext reads tokens and attention probabilities."
            )
        return None

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[-1].attn.num_heads)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    def _default_readout(self) -> Readout:
        if getattr(self.model, "dist_token", None) is not None:
            return "cls_dist"
        if self._pool() == "token":
            return "cls"
        return "mean"

    def _pool(self) -> str:
        """timm's pooling: ``global_pool``, or ``'map'`` when an attention pool is set."""
        if getattr(self.model, "attn_pool", None) is not None:
            return "map"
        return str(getattr(self.model, "global_pool", "token"))

    def readout_refusal(self) -> str | None:
        if (
            self._readout_override is not None
            or getattr(self.model, "dist_token", None) is not None
        ):
            return None
        pool = self._pool()
        if pool in ("token", "avg"):
            return None
        return (
            f"this timm VisionTransformer pools its tokens with global_pool={pool!r}, which no "
            "weighting of token rows reproduces (supported: 'token', 'avg'; or pass readout= "
            "'cls' or 'mean' to read those rows regardless)"
        )

    def readout_weights(
        self,
        num_tokens: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`TransformerAdapter.readout_weights`; timm's ``pool_include_prefix=True``
        average (the default readout of such a model) weighs every row, prefix included."""
        if (
            self._readout_override is None
            and self.readout == "mean"
            and getattr(self.model, "pool_include_prefix", False)
        ):
            return torch.full((num_tokens,), 1.0 / num_tokens, device=device, dtype=dtype)
        return super().readout_weights(num_tokens, device, dtype, mask)

    def check_inputs(
        self, inputs: torch.Tensor, method: str, additional_forward_args: Any = None
    ) -> None:
        """As :meth:`ModelAdapter.check_inputs`; extra model arguments are refused.

        Raises:
            ValueError: Also when ``additional_forward_args`` holds anything but
                ``None`` (timm's forward would take it as ``attn_mask``).
        """
        extra = as_tuple(additional_forward_args)
        if any(v is not None for v in extra):
            raise ValueError(
                f"{method}: a timm VisionTransformer is called as model(images) only; got "
                f"{len(extra)} additional_forward_args, which its forward would take as "
                "attn_mask. Pass additional_forward_args=None."
            )
        super().check_inputs(inputs, method, additional_forward_args)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(p) for p in self.model.patch_embed.patch_size)

    def grid_size(self, inputs: torch.Tensor) -> tuple[int, int]:
        ph, pw = self.patch_size
        h, w = inputs.shape[-2:]
        if getattr(self.model.patch_embed, "dynamic_img_pad", False):
            return -(-h // ph), -(-w // pw)
        return h // ph, w // pw

    def _check_image_size(self, inputs: torch.Tensor, method: str) -> None:
        pe = self.model.patch_embed
        if getattr(pe, "dynamic_img_pad", False):
            return
        dynamic = getattr(self.model, "dynamic_img_size", False)
        img_size = getattr(pe, "img_size", None)
        h, w = inputs.shape[-2:]
        strict = not dynamic and getattr(pe, "strict_img_size", True) and img_size is not None
        if strict and (h, w) != tuple(img_size):  # the only size that works: say that one
            raise ValueError(
                f"{method}: this timm ViT was built for {img_size[0]}x{img_size[1]} images; "
                f"got {h}x{w}. Resize the input to {img_size[0]}x{img_size[1]}, or create the "
                "model with dynamic_img_size=True."
            )
        super()._check_image_size(inputs, method)

    def pre_attention_point(self, block: int = -1) -> Point:
        blk = self.model.blocks[block]
        return Point(blk.attn, "input", None, f"blocks[{block}].attn input (norm1 output)")

    def attention_point(self, block: int) -> Point:
        attn = self.model.blocks[block].attn
        drop = getattr(attn, "attn_drop", None)
        if not isinstance(drop, nn.Module):
            raise NotImplementedError(
                f"blocks[{block}].attn ({type(attn).__name__}) has no attn_drop module where "
                "attention probabilities can be read; supported: timm Attention."
            )
        return Point(drop, "output", None, f"blocks[{block}].attn.attn_drop")

    def token_point(self) -> Point:
        return Point(self.model.patch_drop, "output", None, "patch_drop output")

    def pixel_embedding(self) -> nn.Module:
        return self.model.patch_embed

    @contextlib.contextmanager
    def attention_probabilities(self) -> Iterator[None]:
        changed = []
        try:
            for blk in self.model.blocks:
                attn = blk.attn
                if getattr(attn, "fused_attn", False):
                    changed.append(attn)
                    attn.fused_attn = False
            yield
        finally:
            for attn in changed:
                attn.fused_attn = True
